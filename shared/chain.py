"""The rules a newer release must meet to follow the one a device accepted: a signed chain, and time that only moves on.

Each manifest names the digest of the previous *published* manifest of its run (``previous``);
rounds that published nothing leave gaps in the round numbers, never in the chain. A device
that accepted round ``L`` takes round ``R > L`` only if ``R`` leads back to ``L`` through
``previous`` links: directly, or through intermediate manifests it is given (the round
message carries the last few, ``shared/release_records.py``; a device further behind fetches
the rest from the artifact service, up to :data:`MAX_CATCH_UP` rounds, ``client/fetch.py``), each
verified against the trust list.
A signed release that does not lead back (a fork, or one from another history) is refused.

Time: ``created`` may not lie more than :data:`MAX_CLOCK_SKEW` ahead of the device's clock (a
release "from the future" would otherwise freeze every later one), and the releases of a run
a device accepts never go back in time. A base model has no chain (every base is round 0):
another base replaces the accepted one only if it was created later (no rollback to an older base).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from shared.errors import ReleaseError
from shared.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse
from shared.sign import SignatureError, TrustList

MAX_LINKS = 64  # intermediate manifests a round message may carry (``shared/release_records.py``)
MAX_CATCH_UP = 10_000
"""Rounds a device behind may fetch the manifests of, one by one from the artifact service, each
signature-checked as it arrives (``client/fetch.py``): a device offline for weeks catches up (a few
kB and one call per round); one further behind is refused, naming the gap."""
MAX_CLOCK_SKEW = dt.timedelta(days=1)


class SignedManifest(NamedTuple):
    """A release's manifest and signature without its files: a link of the chain."""

    manifest: bytes
    signature: bytes


class ChainGapError(ReleaseError):
    """A newer release does not lead back to the accepted one through the manifests at hand."""

    def __init__(self, message: str, manifest: Manifest, accepted_round: int) -> None:
        super().__init__(message)
        self.manifest, self.accepted_round = manifest, accepted_round


def verify_links(links: Sequence[SignedManifest], trust: TrustList) -> list[Manifest]:
    """Parse and signature-check intermediate manifests; any bad one refuses the release.

    Raises
    ------
    ReleaseError
        More than :data:`MAX_LINKS` + :data:`MAX_CATCH_UP` links (a message's and the fetched ones), or
        one that is malformed or not signed by a trusted key.
    """
    if len(links) > MAX_LINKS + MAX_CATCH_UP:
        raise ReleaseError(f"{len(links)} chain manifests given, more than {MAX_LINKS + MAX_CATCH_UP}")
    verified = []
    for number, link in enumerate(links, 1):
        try:
            if len(link.manifest) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest is {len(link.manifest):,} bytes")
            manifest = parse(link.manifest)
            trust.verify(manifest.key_id, link.manifest, link.signature)
        except (ManifestError, SignatureError) as exc:
            raise ReleaseError(f"chain manifest {number} refused: {exc}") from None
        verified.append(manifest)
    return verified


def check_time(manifest: Manifest, accepted_created: str, now: dt.datetime | None = None) -> None:
    """Refuse a release created far in the future, or before the release the device accepted last.

    Raises
    ------
    ReleaseError
        Naming both times.
    """
    now = now or dt.datetime.now(dt.UTC)
    if manifest.created_at() > now + MAX_CLOCK_SKEW:
        raise ReleaseError(
            f"round {manifest.round} of run {manifest.run_id} was created {manifest.created}, more than "
            f"{MAX_CLOCK_SKEW} after this device's clock ({now:%Y-%m-%dT%H:%M:%SZ}): refused (check both clocks)"
        )
    if accepted_created and manifest.created < accepted_created:  # one fixed format: text order is time order
        raise ReleaseError(
            f"round {manifest.round} of run {manifest.run_id} was created {manifest.created}, before the release "
            f"this device accepted ({accepted_created}): a run's releases never go back in time"
        )


def check_chain(manifest: Manifest, accepted_round: int, accepted_digest: str, links: Sequence[Manifest]) -> None:
    """Refuse ``manifest`` (round > ``accepted_round``) unless it leads back to ``accepted_digest``.

    ``links`` are verified manifests (:func:`verify_links`); only those of the same run, with a
    round strictly between, are walked, each at most once.

    Raises
    ------
    ChainGapError
        Naming where the walk stopped; :attr:`ChainGapError.accepted_round` says which rounds are missing.
    """
    by_digest = {
        m.digest(): m
        for m in links
        if (m.kind, m.run_id) == (manifest.kind, manifest.run_id) and accepted_round < m.round < manifest.round
    }
    here = manifest
    for _ in range(len(by_digest) + 1):  # each step moves to a strictly older round: bounded
        if here.previous == accepted_digest:
            return
        step = by_digest.get(here.previous)
        if step is None or step.round >= here.round:
            break
        here = step
    through = "" if here is manifest else f" (followed back to round {here.round})"
    raise ChainGapError(
        f"chain broken: round {manifest.round} of run {manifest.run_id} does not lead back to the accepted round "
        f"{accepted_round} ({accepted_digest[:16]}…){through}: round {here.round} names previous "
        f"{here.previous[:16] or '(none)'}…, which is neither the accepted release nor a signed manifest at hand. "
        f"Off the chain, or this device missed more rounds than it was sent manifests for",
        manifest,
        accepted_round,
    )
