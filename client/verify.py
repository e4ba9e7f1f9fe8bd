"""Verify before load: a device installs an adapter release only if every check passes.

The one verifier is ``shared.release.verify_release``; this module adds what only the device
knows (its trust list, its cached base, the releases it accepted before) and loads the
adapter strictly. A device that cannot record the release in its replay store does not use
it. Any failure leaves the adapter that was active untouched.
"""

from __future__ import annotations

from typing import Any

from shared.adapter import ADAPTER_WEIGHTS, adapter_state, load_adapter_state
from shared.manifest import Manifest
from shared.release import Release, ReleaseError, load_tensors, verify_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList


def install_release(
    peft_model: Any, release: Release, trust: TrustList, base_digest: str, accepted: AcceptedReleases
) -> Manifest:
    """Verify ``release`` and load its adapter into ``peft_model``; record it as accepted.

    Raises
    ------
    ReleaseError
        Naming the failed check (signature, file hash, base, replay, replay store) or why the
        adapter does not fit this model. The model's active adapter is then unchanged.
    """
    manifest = verify_release(release, trust, base_digest, accepted)
    if manifest.kind != "adapter":
        raise ReleaseError(
            f"release of run {manifest.run_id} round {manifest.round} is a {manifest.kind}, not an adapter"
        )
    if ADAPTER_WEIGHTS not in release.files:
        raise ReleaseError(f"release has no {ADAPTER_WEIGHTS}")
    state = load_tensors(release.files[ADAPTER_WEIGHTS])
    before = adapter_state(peft_model)
    try:
        load_adapter_state(peft_model, state)  # checks every key and shape before it writes anything
    except ValueError as exc:
        raise ReleaseError(f"the adapter does not fit this model: {exc}") from None
    try:
        accepted.accept(manifest)
    except ReleaseError:
        load_adapter_state(peft_model, before)  # a device that cannot record a release does not use it
        raise
    return manifest
