"""Read-only views of the state store, shaped as the dashboard's JSON API returns them.

Each function takes a connection from :meth:`server.state.StateStore.read` and returns plain
``dict`` / ``list`` values (JSON-ready), or None for a run or round the store does not hold.
Every row is parsed on the way out (``rows.py``): a value that is not what its column says
(``inf``, text in a number column, invalid JSON) reads as None, a row whose key is unusable is
left out, so one damaged or hostile row never stops a view.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from server.state.heartbeat import run_state
from server.state.rows import ClientRow, RoundRow, RunRow, parse_client, parse_round, parse_run, raw_rows
from server.state.schema import STATUSES, client_results, rounds, runs

_SUMMARY = ("run_id", "name", "model", "method", "num_rounds", "started", "finished", "heard")


def list_runs(conn: Connection) -> list[dict[str, Any]]:
    """Every run, newest first, with its progress: rounds done, the last mean held-out loss, and its state.

    ``state`` is ``finished``, ``running`` or ``stopped`` (unfinished and its coordinator silent:
    killed, crashed, or never got going; ``server/state/heartbeat.py``). ``epsilon`` is the ε the
    run has spent (its latest DP round's), None for a run without DP.
    """
    out = []
    for run in sorted(_runs(conn), key=lambda r: r["started"] or 0.0, reverse=True):
        every = _rounds(conn, run["run_id"])
        closed = [r for r in every if r["closed"] is not None]
        summary = _pick(run, _SUMMARY)
        summary["state"] = run_state(run["finished"], run["heard"])
        summary["rounds_done"] = sum(1 for r in closed if r["round"] > 0)
        summary["last_heldout_loss"] = closed[-1]["mean_heldout_loss"] if closed else None
        summary["epsilon"] = epsilon_spent(every)
        out.append(summary)
    return out


def epsilon_spent(rounds_: list[RoundRow]) -> float | None:
    """Return the ε spent by a run: that of its latest round with a readable ε (rounds in order), or None.

    The accountant's ε is cumulative, so the latest round's is the run's; a round released
    without DP or whose ε is unreadable says nothing about it and is passed over.
    """
    spent = [r["privacy"]["epsilon"] for r in rounds_ if r["privacy"] is not None]
    return next((e for e in reversed(spent) if e is not None), None)


def run_view(conn: Connection, run_id: str) -> dict[str, Any] | None:
    """Return a run, its rounds (counts by status, each client's held-out loss), its clients and rejections.

    ``clients`` lists each client once (key, the name it reported last, node id, its accepted
    updates in the run, their mean staleness under async rounds, the rank it trained at if below
    the run's); ``heldout``
    of a round maps a client's key to its held-out loss. Under DP, ``run.privacy`` holds the
    run's facts (``facts.RunPrivacy``) and each round released under DP its ``privacy``
    (``facts.RoundPrivacy``: ε spent so far, z, C, clipped fraction, ...); both are None without DP.
    A round aggregated with SecAgg+ has its ``secure`` (``facts.RoundSecure``: survivors,
    recovered dropouts, parameters), None otherwise.
    """
    run = _run(conn, run_id)
    if run is None:
        return None
    per_round: dict[int, list[ClientRow]] = defaultdict(list)
    for c in _clients(conn, run_id):
        per_round[c["round"]].append(c)
    out_rounds = []
    for rec in _rounds(conn, run_id):
        clients = per_round.get(rec["round"], [])
        out_rounds.append({**rec, **_counts(clients), "heldout": _heldout(clients)})
    rejections = [
        _pick(c, ("round", "client", "name", "node_id", "status", "reason"))
        for n in sorted(per_round)
        for c in per_round[n]
        if c["status"] in ("rejected", "refused")
    ]
    names = _devices(per_round)
    state = run_state(run["finished"], run["heard"])
    return {"run": {**run, "state": state}, "rounds": out_rounds, "clients": names, "rejections": rejections}


def round_view(conn: Connection, run_id: str, server_round: int) -> dict[str, Any] | None:
    """One round: its fields (``privacy`` under DP, ``secure`` under SecAgg+), counts, every client result, settings."""
    run = _run(conn, run_id)
    rec = next((r for r in _rounds(conn, run_id, server_round)), None)
    if run is None or rec is None:
        return None
    clients = _clients(conn, run_id, server_round)
    aggregation = {k: v for k, v in run["config"].items() if k.startswith("aggregation.")}
    return {
        "run": _pick(run, ("run_id", "name", "method", "base_digest", "num_rounds", "releases", "privacy")),
        "aggregation": aggregation,
        "lora_rank": run["config"].get("lora.rank"),  # what a client without a rank of its own trained at
        "round": {**rec, **_counts(clients)},
        "clients": clients,
    }


def _devices(per_round: Mapping[int, list[ClientRow]]) -> list[dict[str, Any]]:
    """Return each client of a run once: key, latest name and node id, accepted updates, their staleness, its rank."""
    rows: dict[str, list[ClientRow]] = defaultdict(list)
    for n in sorted(per_round):
        for c in per_round[n]:
            rows[c["client"]].append(c)
    out = []
    for history in rows.values():
        accepted = [c for c in history if c["status"] == "accepted"]
        stale = [c["staleness"] for c in accepted if c["staleness"] is not None]
        ranks = [c["lora_rank"] for c in accepted if c["lora_rank"] is not None]
        out.append(
            {
                **_pick(history[-1], ("client", "name", "node_id")),  # the last round's name wins
                "accepted": len(accepted),
                "mean_staleness": sum(stale) / len(stale) if stale else None,
                "lora_rank": ranks[-1] if ranks else None,
            }
        )
    return sorted(out, key=_by_name)


def _pick(row: Mapping[str, object], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys}


def _by_name(client: Mapping[str, Any]) -> tuple[str, str]:
    return client["name"], client["client"]


def _runs(conn: Connection, run_id: str | None = None) -> list[RunRow]:
    where = [] if run_id is None else [runs.c.run_id == run_id]
    parsed = (parse_run(row) for row in raw_rows(conn, runs, *where))
    return [r for r in parsed if r is not None]


def _run(conn: Connection, run_id: str) -> RunRow | None:
    return next(iter(_runs(conn, run_id)), None)


def _rounds(conn: Connection, run_id: str, server_round: int | None = None) -> list[RoundRow]:
    where = [rounds.c.run_id == run_id] + ([] if server_round is None else [rounds.c.round == server_round])
    parsed = (parse_round(row) for row in raw_rows(conn, rounds, *where))
    return sorted((r for r in parsed if r is not None), key=lambda r: r["round"])


def _clients(conn: Connection, run_id: str, server_round: int | None = None) -> list[ClientRow]:
    where = [client_results.c.run_id == run_id]
    where += [] if server_round is None else [client_results.c.round == server_round]
    parsed = (parse_client(row) for row in raw_rows(conn, client_results, *where))
    return sorted((c for c in parsed if c is not None), key=lambda c: (c["round"], *_by_name(c)))


def _counts(clients: list[ClientRow]) -> dict[str, int]:
    """How many clients replied, and how many per status (see ``schema.STATUSES``)."""
    counts = {status: 0 for status in STATUSES}
    for c in clients:
        if c["status"] is not None:
            counts[c["status"]] += 1
    return {"participants": len(clients), **counts}


def _heldout(clients: list[ClientRow]) -> dict[str, float]:
    return {c["client"]: c["heldout_loss"] for c in clients if c["heldout_loss"] is not None}
