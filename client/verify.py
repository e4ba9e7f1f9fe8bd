"""Verify before load: a device installs an adapter release only if every check passes.

The one verifier is ``shared.release.verify_release``; this module adds what only the device
knows (its trust list, its cached base, the releases it accepted before) and loads the
adapter strictly. A device that cannot record the release in its replay store does not use
it. Any failure leaves the adapter that was active untouched.

Importing this module costs no torch: the edge runtime (``client/infer.py``) runs
:func:`check_adapter_values` on numpy arrays; :func:`install_release` (training devices) loads
torch and peft when called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.adapter_files import ADAPTER_WEIGHTS
from shared.chain import SignedManifest
from shared.errors import ReleaseError
from shared.manifest import Manifest
from shared.ranks import truncate
from shared.release import Release, verify_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList
from shared.tensors import as_array, load_tensors

# No trained LoRA factor comes near this (they stay well under 10); fp16 still holds it (max 65,504), so a
# signed release can carry it: one such entry already makes B·A swamp the base weights it corrects.
MAX_ADAPTER_VALUE = 1e4


def install_release(
    peft_model: Any,
    release: Release,
    trust: TrustList,
    base_digest: str,
    accepted: AcceptedReleases,
    links: Sequence[SignedManifest] = (),
    rank: int | None = None,
    run_id: str | None = None,
) -> Manifest:
    """Verify ``release`` and load its adapter into ``peft_model``; record it as accepted.

    ``links``: signed manifests of the run's releases before it (the round message carries
    the last few), through which it must lead back to the release the device accepted last.
    ``rank``: a device training below the run's rank loads the release's first ``rank``
    components (``shared/ranks.py``), after the whole release was verified. ``run_id``: the run
    the device serves (``FleetConfig.release_run_id``); a signed release of another run is refused.

    Raises
    ------
    ReleaseError
        Naming the failed check (signature, file hash, base, replay, replay store, non-finite or
        absurd values) or why the adapter does not fit this model. The model's active adapter is
        then unchanged.
    """
    from shared.adapter import adapter_state, load_adapter_state

    manifest = verify_release(release, trust, base_digest, accepted, links)
    if manifest.kind != "adapter":
        raise ReleaseError(
            f"release of run {manifest.run_id} round {manifest.round} is a {manifest.kind}, not an adapter"
        )
    if run_id is not None and manifest.run_id != run_id:
        raise ReleaseError(
            f"release of run {manifest.run_id!r} round {manifest.round}: this round is of run {run_id!r}"
        )
    if ADAPTER_WEIGHTS not in release.files:
        raise ReleaseError(f"release has no {ADAPTER_WEIGHTS}")
    state = load_tensors(release.files[ADAPTER_WEIGHTS])
    check_adapter_values(state)
    if rank is not None:
        try:
            state = truncate(state, rank)
        except ValueError as exc:
            raise ReleaseError(f"the adapter does not fit this device's lora-rank: {exc}") from None
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


def check_adapter_values(state: Mapping[str, Any]) -> None:
    """Refuse an adapter holding an inf, a NaN or a value beyond :data:`MAX_ADAPTER_VALUE`, naming the tensor.

    A signed release is only as sound as the aggregate the coordinator signed; a device checks
    the numbers it is about to compute with too. ``state`` holds torch tensors or numpy arrays.

    Raises
    ------
    ReleaseError
        Naming the first offending tensor, how many entries are not finite, or its largest magnitude.
    """
    for name, tensor in sorted(state.items()):
        values = as_array(tensor)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise ReleaseError(f"the adapter's {name} holds {bad:,} non-finite values (inf or NaN); refused")
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > MAX_ADAPTER_VALUE:
            raise ReleaseError(f"the adapter's {name} holds {peak:.3g}, beyond {MAX_ADAPTER_VALUE:.0e}; refused")
