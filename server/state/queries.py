"""Read-only views of the state store, shaped as the dashboard's JSON API returns them.

Each function takes a connection from :meth:`server.state.StateStore.read` and returns plain
``dict`` / ``list`` values (JSON-ready), or None for a run or round the store does not hold.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, select

from server.state.heartbeat import run_state
from server.state.schema import STATUSES, client_results, rounds, runs


def list_runs(conn: Connection) -> list[dict[str, Any]]:
    """Every run, newest first, with its progress: rounds done, the last mean held-out loss, and its state.

    ``state`` is ``finished``, ``running`` or ``stopped`` (unfinished and its coordinator silent:
    killed, crashed, or never got going; ``server/state/heartbeat.py``).
    """
    out = []
    for run in conn.execute(select(runs).order_by(runs.c.started.desc())).mappings():
        closed = conn.execute(
            select(rounds.c.round, rounds.c.mean_heldout_loss)
            .where(rounds.c.run_id == run["run_id"], rounds.c.closed.is_not(None))
            .order_by(rounds.c.round)
        ).all()
        summary = {k: run[k] for k in ("run_id", "name", "model", "method", "num_rounds", "started", "finished")}
        summary["heard"], summary["state"] = run["heard"], run_state(run["finished"], run["heard"])
        summary["rounds_done"] = sum(1 for r in closed if r.round > 0)
        summary["last_heldout_loss"] = closed[-1].mean_heldout_loss if closed else None
        out.append(summary)
    return out


def run_view(conn: Connection, run_id: str) -> dict[str, Any] | None:
    """Return a run, its rounds (counts by status, each client's held-out loss) and its rejections."""
    run = conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first()
    if run is None:
        return None
    results = conn.execute(
        select(client_results).where(client_results.c.run_id == run_id).order_by(client_results.c.client)
    ).mappings()
    per_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        per_round[r["round"]].append(dict(r))
    out_rounds = []
    for rec in conn.execute(select(rounds).where(rounds.c.run_id == run_id).order_by(rounds.c.round)).mappings():
        clients = per_round.get(rec["round"], [])
        out_rounds.append({**_round_fields(rec), **_counts(clients), "heldout": _heldout(clients)})
    rejections = [
        {k: c[k] for k in ("round", "client", "node_id", "status", "reason")}
        for n in sorted(per_round)
        for c in per_round[n]
        if c["status"] in ("rejected", "refused")
    ]
    clients = sorted({c["client"] for cs in per_round.values() for c in cs})
    state = run_state(run["finished"], run["heard"])
    return {"run": {**run, "state": state}, "rounds": out_rounds, "clients": clients, "rejections": rejections}


def round_view(conn: Connection, run_id: str, server_round: int) -> dict[str, Any] | None:
    """One round: its fields, counts, every client result, and the run's aggregation settings."""
    run = conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first()
    rec = (
        conn.execute(select(rounds).where(rounds.c.run_id == run_id, rounds.c.round == server_round)).mappings().first()
    )
    if run is None or rec is None:
        return None
    clients = [
        dict(c)
        for c in conn.execute(
            select(client_results)
            .where(client_results.c.run_id == run_id, client_results.c.round == server_round)
            .order_by(client_results.c.client)
        ).mappings()
    ]
    config = run["config"] or {}
    aggregation = {k: v for k, v in config.items() if k.startswith("aggregation.")}
    return {
        "run": {k: run[k] for k in ("run_id", "name", "method", "base_digest", "num_rounds", "releases")},
        "aggregation": aggregation,
        "round": {**_round_fields(rec), **_counts(clients)},
        "clients": clients,
    }


def _round_fields(rec: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(rec).items() if k != "run_id"}


def _counts(clients: list[dict[str, Any]]) -> dict[str, int]:
    """How many clients replied, and how many per status (see ``schema.STATUSES``)."""
    counts = {status: 0 for status in STATUSES}
    for c in clients:
        counts[c["status"]] += 1
    return {"participants": len(clients), **counts}


def _heldout(clients: list[dict[str, Any]]) -> dict[str, float]:
    return {c["client"]: c["heldout_loss"] for c in clients if c["heldout_loss"] is not None}
