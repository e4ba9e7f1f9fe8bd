"""Where a restarted coordinator picks up a run: after its last signed release, chain checked.

A run is identified by its run-config ``run-id`` (``shared/config.py``): its releases live in
``<store>/adapter/<run-id>/round-NNNN/``, each signed, each naming the digest of the previous
one. Those folders are the record of what the run has done: a round counts once its
aggregate is signed and written (``server/registry.py`` writes a release folder atomically,
then ``LATEST``). A coordinator killed at any moment therefore leaves either round N's
release complete or no round-N folder at all, and on restart :func:`resume_point` returns the
last release of the unbroken chain; the run goes on with round N + 1. No signed round is lost
or repeated, and round N + 1's manifest names round N's digest, so the chain devices check
(``shared.release.AcceptedReleases``) stays unbroken across the restart.

What a restart does not keep: a round that was in flight (sent, not yet signed) is run again
from the start, and a round whose aggregate was refused (fewer than ``aggregation.min-accepted``
valid updates: no release) is not recorded here. The dashboard's state store records rounds as
they happen; ``server/server_app.py`` resumes from its last signed round after checking it
against this chain (:func:`resume_point`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.files import read_bounded
from shared.manifest import Manifest
from shared.release import Release, ReleaseError, folder_round, read_release, verify_release
from shared.sign import TrustList

MAX_ROUND_LOG_BYTES = 256 << 20  # thousands of rounds of a large fleet's metrics; more is not a round log

if TYPE_CHECKING:
    from server.state import SignedRound


class ResumeError(ReleaseError):
    """The run's release folder cannot be resumed from; the message names the release and the check."""


@dataclass(frozen=True)
class ResumePoint:
    """The last signed release of a run: the next round to run is ``round + 1``."""

    round: int
    release: Release
    manifest: Manifest
    chain: tuple[str, ...]
    """Manifest digests of every published release from round 0 up to ``round``, in order. A round
    whose aggregate was refused published nothing: the chain skips it (each release names the
    previous *published* one), so the chain is indexed by position, not by round number."""
    manifests: tuple[Manifest, ...]
    """The verified manifests of those releases, in the same order."""

    def manifest_of(self, server_round: int) -> Manifest | None:
        """Return the manifest of ``server_round``'s release, or None if that round published none."""
        return next((m for m in self.manifests if m.round == server_round), None)


def resume_point(
    folder: str | Path, trust: TrustList, run_id: str, base_digest: str, method: str
) -> ResumePoint | None:
    """Return the last release of the run stored in ``folder``, or None if it holds no release yet.

    Every ``round-NNNN`` folder is verified in round order: signature by a trusted key, file
    hashes, ``run_id``, ``base_digest``, ``method``, round number equal to the folder's, and
    ``previous`` equal to the digest of the release before it (empty for the first, round 0).

    Raises
    ------
    ResumeError
        A release fails a check, or the chain is broken: resuming would sign a round on top of
        a history devices cannot verify. Move the folder away to start the run anew.
    """
    folder = Path(folder)
    rounds = sorted((r, p) for p in folder.glob("round-*") if (r := folder_round(p.name)) is not None and p.is_dir())
    chain: list[str] = []
    manifests: list[Manifest] = []
    point: ResumePoint | None = None
    for number, path in rounds:
        try:
            release = read_release(path, trust)  # a forged manifest costs no read of the sizes it claims
            manifest = verify_release(release, trust, base_digest)
        except ReleaseError as exc:
            raise ResumeError(f"cannot resume run {run_id} from {path}: {exc}") from None
        expected = {"kind": "adapter", "run_id": run_id, "round": number, "method": method}
        for field, value in expected.items():
            got = getattr(manifest, field)
            if got != value:
                raise ResumeError(f"cannot resume from {path}: its {field} is {got!r}, not {value!r}")
        previous = chain[-1] if chain else ""
        if manifest.previous != previous:
            named = manifest.previous[:16] or "(none)"
            raise ResumeError(
                f"cannot resume from {path}: the chain is broken (it names previous {named}, "
                f"the release before it is {previous[:16] or '(none)'})"
            )
        chain.append(manifest.digest())
        manifests.append(manifest)
        point = ResumePoint(number, release, manifest, tuple(chain), tuple(manifests))
    return point


def unrecorded_rounds(point: ResumePoint | None, signed: SignedRound | None, store: str | Path) -> list[int]:
    """Check the state store's last signed round against the verified chain; return the signed rounds it lacks.

    ``signed`` is the store's record (``StateStore.last_signed_round``), ``point`` what
    :func:`resume_point` verified on disk. The registry writes a release before the round log
    commits it to the store, so a coordinator killed in between leaves the disk one release
    ahead: that release is complete, signed, and devices may hold it, so its round is returned
    here to be recorded, never signed again (a second round-N release would fork the chain).
    Rounds that published no release are neither on disk nor returned.

    Raises
    ------
    ResumeError
        The store records a round the release folder does not hold, or a different manifest for
        it: the store and the releases belong to different deployments (or one was restored from
        an older backup); resuming would sign on top of a history the two disagree about.
    """
    if signed is not None:
        on_disk = "none" if point is None else f"only up to round {point.round}"
        if point is None or point.round < signed.round:
            raise ResumeError(
                f"the state store {store} records run {signed.run_id} signed up to round {signed.round}, but its "
                f"release folder holds {on_disk}: the store and the releases belong to different deployments"
            )
        manifest = point.manifest_of(signed.round)
        if manifest is None or manifest.digest() != signed.manifest_digest:
            held = "no release" if manifest is None else f"the signed release {manifest.digest()[:16]}"
            raise ResumeError(
                f"the state store {store} records round {signed.round} of run {signed.run_id} as manifest "
                f"{signed.manifest_digest[:16]}, but its release folder holds {held} for that round"
            )
    if point is None:
        return []
    return [m.round for m in point.manifests if signed is None or m.round > signed.round]


def carried_rounds(round_log: str | Path) -> list[dict[str, Any]]:
    """Return the round records of an earlier attempt's round log (none if there is none or it is unreadable).

    Parsed as a file anyone may have written: a record is kept only with an integer ``round``, its
    ``clients`` only as a mapping of mappings, ``privacy`` and ``secure`` only as mappings (the state
    store bounds each value in them); its ``release`` is dropped: the resume takes every round's
    release from the verified chain instead (``server_app._resume``), never from this file.
    """
    try:
        data = json.loads(read_bounded(round_log, MAX_ROUND_LOG_BYTES))
        rounds = data.get("rounds", []) if isinstance(data, dict) else []
    except (OSError, ValueError, RecursionError):
        return []
    return [_carried(r) for r in rounds if isinstance(r, dict) and type(r.get("round")) is int and r["round"] >= 0]


def _carried(rec: dict[str, Any]) -> dict[str, Any]:
    """Return one parsed round record of a carried round log (see :func:`carried_rounds`)."""
    clients = rec.get("clients")
    clients = {k: v for k, v in clients.items() if isinstance(v, dict)} if isinstance(clients, dict) else {}
    out = {k: v for k, v in rec.items() if k not in ("release", "privacy", "secure")} | {"clients": clients}
    return out | {k: rec[k] for k in ("privacy", "secure") if isinstance(rec.get(k), dict)}
