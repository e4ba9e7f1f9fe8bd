"""The replay store: the last release a device accepted, per run, so that it never goes back. It fails closed.

One JSON file, ``{"<kind>:<run_id>": {"round": r, "digest": "<manifest sha256>", "created": t}}``
(``created`` is absent in records written before it was kept), and per run whose rounds ran under
secure aggregation ``{"secure:<run_id>": {"round": r}}``: the last server round this device masked
a delta for (:meth:`AcceptedReleases.mask_once`). It is read strictly, again before
every check and every change (``fetch``, ``infer`` and the training client of one device share
it): a file that exists but is empty, truncated, not JSON, of the wrong shape, or not a regular
file is a :class:`ReplayStoreError`, and the device refuses every release until an operator
repairs it. A damaged record never reads as "no history": that would accept round 1 after round 3.
Every change is made under an exclusive lock (``accepted.json.lock``), to the run's record only,
and written with :func:`shared.atomic.write_atomic` (fsync of the file and its folder).

A missing file is a device that has accepted nothing yet: its first release is trusted on first
use, as a fresh device must.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shared.atomic import write_atomic
from shared.chain import check_chain, check_time
from shared.errors import ReleaseError
from shared.files import FileRefusedError, open_checked, read_bounded
from shared.manifest import Manifest

STATE_FILE = "accepted.json"
MAX_STORE_BYTES = 1 << 20  # thousands of runs; a larger file is not ours
LOCK_WAIT_S = 60  # an accept holds the store's lock for milliseconds
_KEY = re.compile(r"(base|adapter|secure):[^\x00-\x1f]{1,200}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # as manifests write it (shared/manifest.py)


class ReplayStoreError(ReleaseError):
    """The replay store cannot be read or written; every release is refused until an operator repairs it."""


def default_state_file(release_cache: str | Path) -> Path:
    """Return the replay store of a device's release cache (``fleetlora fetch`` and ``fleetlora infer`` share it)."""
    return Path(release_cache) / STATE_FILE


class AcceptedReleases:
    """The last release a device accepted per run: refuses replays, rollbacks, forks and gaps off the chain.

    The release in use may come again (each round sends it with the train and evaluate
    messages); an older round, or a different release for the same round, is refused; a newer
    one must lead back to it (``shared/chain.py``).

    Raises
    ------
    ReplayStoreError
        From the constructor, if ``path`` exists but is not a readable, well-formed store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.runs: dict[str, dict[str, Any]] = _load(self.path)
        self._checked: dict[str, str | None] = {}
        """Per manifest digest checked, the digest of its run's record then (None: no record)."""

    def accepted_round(self, kind: str, run_id: str) -> int | None:
        """Return the round of the run's release this device accepted last (None: none), as the store was last read."""
        last = self.runs.get(_key(kind, run_id))
        return None if last is None else int(last["round"])

    def check(self, manifest: Manifest, links: Sequence[Manifest] = (), now: dt.datetime | None = None) -> None:
        """Refuse a release that does not follow the last accepted one of its run (``shared/chain.py``).

        ``links``: verified intermediate manifests of the run (``shared.chain.verify_links``), for
        a device that missed rounds. ``now``: the device's clock (default: now, UTC). The store is
        read again first: another process of the device (``fetch``, a long ``infer`` session, the
        training client) may have accepted a newer release since this one read it.

        Raises
        ------
        ReleaseError
            A replay or rollback (not newer), a fork, a release off the chain
            (:class:`shared.chain.ChainGapError`), from the future, or older than the accepted one.
        """
        self.runs = _load(self.path)
        last = self.runs.get(_key(manifest.kind, manifest.run_id))
        self._checked[manifest.digest()] = last["digest"] if last else None  # what accept() expects to find
        check_time(manifest, "", now)
        if last is None:
            return  # trusted on first use
        if manifest.digest() == last["digest"]:
            return  # the release already in use, delivered again (a train message after an evaluate one)
        if manifest.kind == "base":
            if manifest.created > last.get("created", ""):
                return  # a base published after the accepted one; an older one is a rollback
            raise ReleaseError(
                f"this device's base is pinned to manifest {last['digest'][:16]}… ({last.get('created') or 'no date'});"
                f" base {manifest.digest()[:16]}… ({manifest.created}) is not newer: refused. To change to it on "
                f"purpose, remove the 'base:base' record from {self.path}"
            )
        if manifest.round <= last["round"]:
            raise ReleaseError(
                f"replay: round {manifest.round} of run {manifest.run_id} is not newer than the accepted "
                f"round {last['round']}"
            )
        check_time(manifest, last.get("created", ""), now)
        check_chain(manifest, last["round"], last["digest"], links)

    def accept(self, manifest: Manifest) -> None:
        """Record ``manifest`` as the run's latest accepted release (atomically, durably).

        Under an exclusive lock on the store, the store is read again and only this run's record
        changes: two processes of one device (``fetch`` beside an ``infer`` session) no longer
        write back each other's stale copies, which erased a record and let its run's old rounds
        be accepted again. If the run's record changed since :meth:`check` passed this release
        (another process accepted a release of the run meanwhile: a newer round, or another round on
        a fork), this one is refused; it is checked again next time. A release this store did not
        :meth:`check` is refused (fail closed: nothing is recorded that was not checked).

        Raises
        ------
        ReplayStoreError
            The record could not be written; the caller must not use the release.
        ReleaseError
            Another process of this device accepted a release of this run meanwhile, or holds the
            store's lock for more than ``LOCK_WAIT_S``; or this store never checked the release.
        """
        if manifest.digest() not in self._checked:
            raise ReleaseError(
                f"{manifest.kind} {manifest.run_id} round {manifest.round} was not checked against {self.path}: "
                "not recorded (verify it with this store first)"
            )
        entry = {"round": manifest.round, "digest": manifest.digest(), "created": manifest.created}

        def change(last: dict[str, Any] | None) -> dict[str, Any]:
            _refuse_changed(last, self._checked[manifest.digest()], manifest, self.path)
            return entry

        self._update(_key(manifest.kind, manifest.run_id), change, "the release is not used")

    def mask_once(self, run_id: str, server_round: int) -> None:
        """Record that this device masks a delta for ``server_round`` of ``run_id``; refuse a round not after the last.

        A device trains the same delta for the same round (its seed is the run's seed, the round and
        its name): a secure round run twice, once with a device and once without it (a coordinator
        that restarts mid-round and resumes it, or one that does so on purpose), gives two sums whose
        difference is that device's delta. So a device masks at most once per round of a run, in
        increasing rounds; the record is written before training (fail closed: a round whose
        training then fails is not trained again) and kept across restarts.

        Raises
        ------
        ReleaseError
            ``server_round`` is not after the last round this device masked for the run.
        ReplayStoreError
            The record could not be written; the caller must not train.
        """

        def change(last: dict[str, Any] | None) -> dict[str, Any]:
            if last is not None and server_round <= last["round"]:
                raise ReleaseError(
                    f"secure round {server_round} of run {run_id}: this device already masked a delta for round "
                    f"{last['round']}; it masks once per round, in increasing rounds (two sums of one round that "
                    "differ by one device would reveal that device's delta)"
                )
            return {"round": server_round}

        self._update(_key("secure", run_id), change, "the secure round is not trained")

    def _update(self, key: str, change: Callable[[dict[str, Any] | None], dict[str, Any]], refused: str) -> None:
        """Under the store's lock, read it again and set ``key``'s record to ``change(its record now)``; persist it.

        Only that record changes (another process's records stay); ``change`` raises to refuse.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(self.path.with_name(self.path.name + ".lock")):
                runs = _load(self.path)
                runs[key] = change(runs.get(key))
                write_atomic(self.path, json.dumps(runs, indent=1, sort_keys=True).encode())
        except TimeoutError as exc:
            raise ReleaseError(f"replay store {self.path}: {exc}; {refused}") from None
        except OSError as exc:
            raise _unusable(self.path, f"it cannot be written ({exc})") from None
        self.runs = runs


def _refuse_changed(last: dict[str, Any] | None, seen: str | None, manifest: Manifest, path: Path) -> None:
    """Refuse ``manifest`` if its run's record is no longer the one :meth:`AcceptedReleases.check` saw."""
    now = last["digest"] if last else None
    if now not in (seen, manifest.digest()):
        found = f"round {last['round']} (manifest {now[:16]}…)" if last and now else "no record (it was removed)"
        raise ReleaseError(
            f"the record of {manifest.kind} {manifest.run_id} in {path} changed after round {manifest.round} was "
            f"checked: another process of this device left {found}; not used (checked again when it comes next)"
        )


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (a regular file; a FIFO or link there is refused, not opened).

    Opened read-only (``flock`` needs no more) and created with the store's own mode less the
    umask, so that users who share a cache share its lock. Waits at most ``LOCK_WAIT_S``
    (``TimeoutError``): an update holds it for milliseconds.
    """
    fd, _ = open_checked(lock, os.O_RDONLY | os.O_CREAT, follow_links=False)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held its lock {lock} for over {LOCK_WAIT_S} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _key(kind: str, run_id: str) -> str:
    """Return the key of a run's record in the store: ``adapter:<run-id>``, ``base:base``."""
    return f"{kind}:{run_id}"


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """Read the store strictly; a missing file is an empty history, anything else unreadable an error."""
    try:
        if not path.exists() and not path.is_symlink():
            return {}
        data = read_bounded(path, MAX_STORE_BYTES)
    except FileRefusedError as exc:
        raise _unusable(path, f"it is {str(exc).removeprefix(f'{path}: ')}") from None
    except OSError as exc:
        raise _unusable(path, f"it cannot be read ({exc})") from None
    if not data.strip():
        raise _unusable(path, "it is empty (a write cut short, or a power loss before it reached the disk)")
    try:
        runs = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _unusable(path, f"it is not UTF-8 JSON, truncated or damaged ({exc})") from None
    if not isinstance(runs, dict):
        raise _unusable(path, f"it holds a JSON {type(runs).__name__}, not an object of runs")
    for key, entry in runs.items():
        _check_entry(path, key, entry)
    return runs


def _check_entry(path: Path, key: str, entry: Any) -> None:
    if not _KEY.fullmatch(key):
        raise _unusable(path, f"its key {key!r:.80} is not '<base|adapter|secure>:<run id>'")
    if key.startswith("secure:"):
        if not isinstance(entry, dict) or set(entry) != {"round"} or type(entry["round"]) is not int:
            raise _unusable(path, f"the record of {key!r:.80} is not {{round}}")
        if entry["round"] < 0:
            raise _unusable(path, f"the round of {key!r:.80} is not a round number")
        return
    if not isinstance(entry, dict) or not {"round", "digest"} <= set(entry) <= {"round", "digest", "created"}:
        raise _unusable(path, f"the record of {key!r:.80} is not {{round, digest[, created]}}")
    if type(entry["round"]) is not int or entry["round"] < 0:
        raise _unusable(path, f"the round of {key!r:.80} is not a round number")
    if not (isinstance(entry["digest"], str) and _HEX64.fullmatch(entry["digest"])):
        raise _unusable(path, f"the digest of {key!r:.80} is not 64 lowercase hex digits")
    created = entry.get("created", "")
    if not (isinstance(created, str) and (created == "" or _TIME.fullmatch(created))):
        raise _unusable(path, f"the creation time of {key!r:.80} is not YYYY-MM-DDTHH:MM:SSZ")


def _unusable(path: Path, why: str) -> ReplayStoreError:
    return ReplayStoreError(
        f"replay store {path} is unusable: {why}. This device refuses every release until an operator repairs "
        f"it: restore it from a backup, or delete it if the device is known to hold no release newer than the "
        f"next one it will be sent (that one is then trusted as the first)"
    )
