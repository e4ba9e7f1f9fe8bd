"""Checks shared by the secure-aggregation tests that run real devices (a simulation, a real fleet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.release import load_tensors, read_release


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One float64 vector of a delta's tensors, in key order."""
    return np.concatenate([arrays[k].astype(np.float64).ravel() for k in sorted(arrays)])


def first_step(releases: Path, keys: list[str]) -> np.ndarray:
    """What round 1's signed release moved the adapter by (round-0001 minus round-0000), over ``keys``, flat."""
    before = load_tensors(read_release(releases / "round-0000").files["adapter_model.safetensors"])
    after = load_tensors(read_release(releases / "round-0001").files["adapter_model.safetensors"])
    return np.concatenate([(after[k] - before[k]).double().numpy().ravel() for k in keys])


def assert_step_is_the_mean(releases: Path, true: dict[int, dict[str, np.ndarray]]) -> np.ndarray:
    """Assert round 1's step is the mean of the devices' ``true`` deltas (fp16 release, SecAgg+ quantization)."""
    step = first_step(releases, sorted(next(iter(true.values()))))
    mean = np.mean([flat(d) for d in true.values()], axis=0)
    assert np.linalg.norm(step - mean) < 0.05 * np.linalg.norm(mean)
    return mean
