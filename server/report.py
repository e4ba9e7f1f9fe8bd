"""The round log: what each round did, per client, written as the run progresses.

``rounds.json`` in the run's output folder is rewritten after every change (atomically), so
a run that stops early still leaves every finished round on disk; with a state store
(``server/state/``), every change is also committed there, which the dashboard reads.
:func:`format_table` renders the log for an operator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from server.state import StateStore
from server.state.facts import RoundPrivacy, round_privacy, round_secure
from shared.atomic import write_atomic


class RoundLog:
    """Accumulates per-round, per-client results and persists them after each change.

    Parameters
    ----------
    path
        The JSON file (``rounds.json``), rewritten after every change.
    run
        The run's facts (``run_id``, model, method, config, ...); ``run_id`` is required with a store.
    store
        Also commit every change to this state store (the run, then each round and client entry).
    """

    def __init__(self, path: str | Path, run: dict[str, Any], store: StateStore | None = None) -> None:
        if store is not None and "run_id" not in run:
            raise ValueError("a round log that writes a state store needs the run's 'run_id'")
        self.path = Path(path)
        self.store = store
        self.data: dict[str, Any] = {"run": {**run, "started": time.time()}, "rounds": []}
        self._save()

    def round(self, server_round: int) -> dict[str, Any]:
        """Return the record of ``server_round``, created on first use."""
        for rec in self.data["rounds"]:
            if rec["round"] == server_round:
                return rec
        rec = {"round": server_round, "clients": {}, "started": time.time()}
        self.data["rounds"].append(rec)
        return rec

    def client(self, server_round: int, node_id: int, name: str | None = None, **values: Any) -> None:
        """Merge ``values`` into the entry of node ``node_id`` for the round and persist.

        Entries are keyed by the node id the SuperLink authenticated (``str(node_id)``), never by
        what a device says of itself: ``name``, the name it reported, is display text only
        (``node-<id>`` until it reports one), so two devices claiming one name stay two entries.
        """
        key = str(node_id)
        entry = self.round(server_round)["clients"].setdefault(key, {"node_id": node_id, "name": f"node-{node_id}"})
        if name is not None:
            entry["name"] = name
        entry.update(values)
        self._save(server_round, [key])

    def forget(self, server_round: int, node_id: int, *keys: str) -> None:
        """Remove ``keys`` from the entry of node ``node_id`` for the round (if it has one) and persist.

        An asynchronous release may take a device's second update of the round after its first was
        rejected: the entry then says what the release holds, not what an earlier attempt did.
        """
        entry = self.round(server_round)["clients"].get(str(node_id))
        if entry is not None and any(k in entry for k in keys):
            for key in keys:
                entry.pop(key, None)
            self._save(server_round, [str(node_id)])

    def note(self, server_round: int, **values: Any) -> None:
        """Record round-level ``values`` (e.g. the signed release) and persist."""
        self.round(server_round).update(values)
        self._save(server_round, [])

    def close_round(self, server_round: int, **values: Any) -> dict[str, Any]:
        """Finish a round: derive its means and totals, record extra ``values``, persist."""
        rec = self.round(server_round)
        clients = rec["clients"].values()
        for key in ("train_loss", "heldout_loss"):
            vals = [c[key] for c in clients if key in c]
            if vals:
                rec[f"mean_{key}"] = sum(vals) / len(vals)  # each client counts once
        for key in ("bytes_up", "bytes_down"):
            rec[key] = sum(c.get(key, 0) for c in clients)
        rec["seconds"] = time.time() - rec["started"]
        rec.update(values)
        self._save(server_round)
        return rec

    def note_run(self, **values: Any) -> None:
        """Record run-level ``values`` (e.g. its privacy settings, known once devices connect) and persist."""
        self.data["run"].update(values)
        self._save()

    def finish(self, **values: Any) -> None:
        """Record the end of the run (final adapter path, wall time)."""
        self.data["run"].update(values, finished=time.time())
        self._save()

    def _save(self, server_round: int | None = None, clients: Iterable[str] | None = None) -> None:
        """Rewrite the JSON file; commit the run (no round given) or the round's changed clients to the store."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1).encode())  # a restart resumes from it
        if self.store is None:
            return
        run = self.data["run"]
        if server_round is None:
            self.store.save_run(run)
        else:
            rec = {"method": run.get("method"), **self.round(server_round)}
            self.store.save_round(run["run_id"], rec, clients)


def format_table(data: dict[str, Any]) -> str:
    """Render the round log as a fixed-width table (round 0 = before any training).

    ``key id`` and ``manifest`` name the signed release each round ended with (the manifest's
    SHA-256, first 16 hex digits; ``fleetlora verify`` prints it whole). When any round released
    under differential privacy, ``ε`` is the privacy spent by the run after that round and
    ``clipped`` the share of its updates clipped to C; a line under the table says at which δ.
    ``secure sum``: a round aggregated by SecAgg+, its survivors (and devices recovered after dropping out, and
    how many survivors were enrolled devices: their keys signed, the round checked for one survivor story).
    """
    rounds = sorted(data["rounds"], key=lambda r: r["round"])
    privacy = [_privacy(r) for r in rounds]
    dp = any(p is not None for p in privacy)
    secure = any(isinstance(r.get("secure"), Mapping) for r in rounds)
    labels = _labels(rounds)
    keys = sorted(labels, key=lambda k: (labels[k], k))
    head = ["round", "clients", "rejected", "train loss"] + [f"held-out {labels[k]}" for k in keys]
    head += ["held-out mean"] + (["ε", "clipped"] if dp else []) + (["secure sum"] if secure else [])
    head += ["MB up", "MB down", "key id", "manifest"]
    rows = []
    for r, p in zip(rounds, privacy, strict=True):
        trained = [c for c in r["clients"].values() if "train_loss" in c or "num_examples" in c]
        row = [
            "before" if r["round"] == 0 else str(r["round"]),
            str(len(trained) if r["round"] else len(r["clients"])),
            str(sum("rejected" in c for c in r["clients"].values())),
            _num(r.get("mean_train_loss")),
        ]
        row += [_num(r["clients"].get(k, {}).get("heldout_loss")) for k in keys]
        row += [_num(r.get("mean_heldout_loss"))]
        if dp:
            row += ["-", "-"] if p is None else [_epsilon(p["epsilon"]), _percent(p["clipped_fraction"])]
        if secure:
            row += [_secure(r.get("secure"))]
        row += [_mb(r.get("bytes_up")), _mb(r.get("bytes_down"))]
        release = r.get("release", {})
        row += [release.get("key_id", "-"), release.get("manifest", "-")[:16]]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    per_client = [c for r in rounds if r["round"] for c in r["clients"].values() if "bytes_up" in c]
    if per_client:
        up = sum(c["bytes_up"] for c in per_client) / len(per_client)
        down = sum(c["bytes_down"] for c in per_client) / len(per_client)
        lines.append(f"(MB: per round, all clients. Per client-round: {up:,.0f} bytes up, {down:,.0f} bytes down)")
    latest = next((p for p in reversed(privacy) if p is not None), None)
    if latest is not None:
        lines.append(_privacy_note(latest))
    for r in rounds:
        for key, c in sorted(r["clients"].items(), key=lambda kc: (labels[kc[0]], kc[0])):
            if "rejected" in c:
                lines.append(f"round {r['round']}: the update of {labels[key]} was rejected: {c['rejected']}")
            if "evaluation_rejected" in c:
                reason = c["evaluation_rejected"]
                lines.append(f"round {r['round']}: the evaluation of {labels[key]} was rejected: {reason}")
            if "refused_release" in c:
                lines.append(f"round {r['round']}: {labels[key]} refused the signed release: {c['refused_release']}")
    return "\n".join(lines)


def clients_by_name(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return a round record's client entries by their reported name (for reading a log whose names are unique)."""
    return {str(c.get("name", key)): c for key, c in rec["clients"].items()}


def _labels(rounds: list[dict[str, Any]]) -> dict[str, str]:
    """Label each node by its reported name; a name two nodes report is told apart by the node id."""
    names = {key: str(c.get("name", key)) for r in rounds for key, c in r["clients"].items()}
    taken: dict[str, int] = {}
    for name in names.values():
        taken[name] = taken.get(name, 0) + 1
    return {key: name if taken[name] == 1 else f"{name} (node {key})" for key, name in names.items()}


def _secure(values: Any) -> str:
    """Return a secure round's survivors, with the recovered and enrolled ("5 (1 recovered, 5 enrolled)"), or "-"."""
    if not isinstance(values, Mapping):
        return "-"
    facts = round_secure(values)
    if facts["survivors"] is None:
        return "-"
    enrolled = facts["enrolled"] if (facts["enrolled"] or 0) <= facts["survivors"] else None  # a damaged log
    notes = [f"{n} {what}" for what, n in (("recovered", facts["recovered"]), ("enrolled", enrolled)) if n]
    return f"{facts['survivors']} ({', '.join(notes)})" if notes else str(facts["survivors"])


def _privacy(rec: Mapping[str, Any]) -> RoundPrivacy | None:
    """Return a round's privacy facts, bounded as the state store keeps them; None if it released none under DP."""
    values = rec.get("privacy")
    return round_privacy(values) if isinstance(values, Mapping) else None


def _privacy_note(p: RoundPrivacy) -> str:
    """Say what the ε and clipped columns mean, with the latest DP round's mechanism."""
    where = {"server": "by the coordinator on receipt", "client": "on each device before upload"}
    return (
        f"(ε: client-level differential privacy spent by the run after each round, at δ = {_g(p['delta'])}; "
        f"noise multiplier z = {_g(p['noise_multiplier'])}, clip norm C = {_g(p['clip_norm'])}, "
        f"clipped {where.get(p['clipping'] or '', 'where not recorded')}; clipped: share of the round's updates "
        f"whose norm exceeded C)"
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _epsilon(value: float | None) -> str:
    """3 decimals; 3 significant digits from 10,000 on (a tiny z spends an ε no one reads to the decimal)."""
    return "-" if value is None else f"{value:.3f}" if value < 1e4 else f"{value:.3g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _mb(value: int | None) -> str:
    return "-" if not value else f"{value / 1e6:.2f}"
