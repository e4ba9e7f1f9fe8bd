"""A PEFT LoRA adapter as an ONNX Runtime adapter file (``.onnx_adapter``) for the exported base.

The exported graph (``client/export.py``, ``client/onnx_graph.py``) adds ``[sums(x) | x @ A] @ B'``
to each quantized layer, where ``sums(x)`` are the sums of each block of 32 inputs and
``B' = [C ; B]`` carries the base's exact correction (``C``, per-block offsets) followed by the
LoRA factor. PEFT stores
``lora_A.weight`` (r, K) and ``lora_B.weight`` (N, r) and computes
``y = W x + (alpha / r) * B_peft A_peft x`` (Hu et al., 2021, arXiv 2106.09685), so::

    A = A_peft.T,      B = (alpha / r) * B_peft.T

A layer the builder packs (q, k, v in one ``qkv_proj``) gets ``A = [A_q | A_k | A_v]``
(K, 3r) and a block-diagonal ``B`` (3r, N_q + N_k + N_v): the same three products.
A module the adapter does not target contributes zeros. Every adapter file, and the base's own
(``C`` and a zero LoRA column, :func:`base_tensors`), carries the correction: ONNX Runtime GenAI feeds
*empty* factors to a generation with no adapter active, so one must always be active. Conversion refuses, naming the
cause, an adapter this graph cannot serve exactly (DoRA, per-module ranks or alphas, factors of
another rank than the config's ``r``, a module named twice, a module the graph has no LoRA input
for, a shape that does not fit, a rank wider than its layer).

numpy only (``shared.tensors.load_arrays`` parses the release): an inference-only device
(``fleetlora[edge]``) converts adapters without torch. :class:`client.infer.EdgeModel` runs the
conversion in a child process (``python -m client.onnx_adapter``, :func:`convert`), handing it the
verified bytes on stdin: the ~100 MB the conversion allocates are never part of the serving
process, which imports neither numpy nor onnxruntime's Python API for it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import MAX_LORA_RANK, MAX_LORA_SCALE
from shared.tensors import as_array

PEFT_PREFIX = "base_model.model."
BLOCK = 32  # the 4-bit base's block size along K (shared/int4.py): the correction sums each block


class AdapterError(ValueError):
    """The adapter cannot be served by this exported model."""


def lora_scale(adapter_config: bytes) -> float:
    """Return the LoRA scale of PEFT's ``adapter_config.json``; refuse options the graph does not implement."""
    return lora_rank_and_scale(adapter_config)[1]


def lora_rank_and_scale(adapter_config: bytes) -> tuple[int, float]:
    """Return the rank ``r`` and the LoRA scale of PEFT's ``adapter_config.json`` (see :func:`lora_scale`)."""
    try:
        cfg = json.loads(adapter_config)
        r, alpha = cfg["r"], cfg["lora_alpha"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise AdapterError(f"adapter_config.json is not a PEFT LoRA config: {exc}") from None
    if type(r) is not int or not 1 <= r <= MAX_LORA_RANK:
        raise AdapterError(f"adapter_config.json has r = {r!r:.40}; a LoRA rank is an integer in [1, {MAX_LORA_RANK}]")
    if type(alpha) not in (int, float) or not 0 < alpha < math.inf:  # NaN fails too
        raise AdapterError(f"adapter_config.json has lora_alpha = {alpha!r:.40}; a positive finite number is a scale")
    for option in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(option):
            raise AdapterError(f"adapter_config.json sets {option}; the ONNX export serves plain LoRA only")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if scale > MAX_LORA_SCALE:
        raise AdapterError(f"adapter_config.json scales the update by {scale:g}: refused (beyond {MAX_LORA_SCALE:g})")
    return r, scale


def base_tensors(corrections: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the graph's branch inputs for the base alone: ``A`` one zero column, ``B' = [C ; 0]`` (exact)."""
    out: dict[str, np.ndarray] = {}
    for layer, c in corrections.items():
        out[f"{layer}.lora_A"] = np.zeros((c.shape[0] * BLOCK, 1), np.float32)
        out[f"{layer}.lora_B"] = np.concatenate([c.astype(np.float32), np.zeros((1, c.shape[1]), np.float32)])
    return out


def onnx_lora_tensors(
    state: Mapping[str, np.ndarray],
    scale: float,
    layers: Mapping[str, Mapping[str, Any]],
    corrections: Mapping[str, np.ndarray],
    rank: int | None = None,
) -> dict[str, np.ndarray]:
    """Map PEFT tensors onto the graph's branch inputs after the base's correction.

    ``layers`` is ``export.json``'s ``lora_layers``; ``corrections`` the export's per-layer ``C``;
    ``rank`` the config's ``r``, which every module's factors must have (None: one rank, any).
    A rank wider than the layer it adapts (min of its in and out features) is refused: it adds
    nothing a narrower one could not, and the converted inputs grow with it.
    """
    modules = _by_module(state, rank)
    known = {m for info in layers.values() for m in info["modules"]}
    unknown = sorted(set(modules) - known)
    if unknown:
        raise AdapterError(f"the adapter targets {unknown[:3]}, which the ONNX model has no LoRA input for")
    out: dict[str, np.ndarray] = {}
    for layer, info in layers.items():
        a_parts, b_parts = [], []
        for module, n in zip(info["modules"], info["out"], strict=True):
            a, b = modules.get(module, (np.zeros((1, info["in"]), np.float32), np.zeros((n, 1), np.float32)))
            if a.shape[1] != info["in"] or b.shape[0] != n or a.shape[0] > min(info["in"], n):
                raise AdapterError(
                    f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                    f"{info['in']} -> {n} layer (a rank is at most {min(info['in'], n)} there)"
                )
            a_parts.append(a.T)  # (K, r)
            b_parts.append(scale * b.T)  # (r, N)
        a_full = np.concatenate(a_parts, axis=1)  # (K, r)
        b_full = np.concatenate([corrections[layer], _block_diag(b_parts)], axis=0)  # (K/32 + r, N)
        out[f"{layer}.lora_A"] = np.ascontiguousarray(a_full, dtype=np.float32)
        out[f"{layer}.lora_B"] = np.ascontiguousarray(b_full, dtype=np.float32)
    return out


def write_onnx_adapter(tensors: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write ``tensors`` as an ONNX Runtime adapter file (flatbuffers; what ``og.Adapters.load`` reads)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # its own: two sessions
    os.close(fd)  # converting one release at once each write their own file, and the last rename wins
    try:
        fmt.export_adapter(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _block_diag(blocks: list[np.ndarray]) -> np.ndarray:
    """Return the block-diagonal matrix of ``blocks`` (each (r_i, N_i)): (sum r_i, sum N_i)."""
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), np.float32)
    row = col = 0
    for b in blocks:
        out[row : row + b.shape[0], col : col + b.shape[1]] = b
        row, col = row + b.shape[0], col + b.shape[1]
    return out


def _by_module(state: Mapping[str, np.ndarray], rank: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Group PEFT tensors as ``{module: (lora_A (r, K), lora_B (N, r))}``, refusing anything else.

    Every module's two factors share one rank in [1, ``MAX_LORA_RANK``], ``rank`` when given (the
    config's ``r``: its scale is ``alpha / r``); a module named twice (with and without PEFT's
    prefix) is refused, not one of them dropped.
    """
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        stem, dot, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not dot or factor not in ("A.weight", "B.weight") or np.ndim(value) != 2:
            raise AdapterError(f"adapter tensor {key!r:.120} is not a LoRA factor (….lora_A.weight / ….lora_B.weight)")
        if factor[0] in pairs.get(stem, {}):
            raise AdapterError(f"adapter has two lora_{factor} tensors for {stem!r:.120}")
        pairs.setdefault(stem, {})[factor[0]] = as_array(value).astype(np.float32)
    incomplete = sorted(m for m, p in pairs.items() if set(p) != {"A", "B"})
    if incomplete:
        raise AdapterError(f"adapter has only one LoRA factor for {incomplete[:3]}")
    for module, p in pairs.items():
        r_a, r_b = p["A"].shape[0], p["B"].shape[1]
        if r_a != r_b or not 1 <= r_a <= MAX_LORA_RANK or rank is not None and r_a != rank:
            expected = f"r = {rank} (adapter_config.json)" if rank is not None else f"one rank in [1, {MAX_LORA_RANK}]"
            raise AdapterError(
                f"{module:.120}: lora_A of rank {r_a} and lora_B of rank {r_b}; this graph serves {expected} "
                "for every module"
            )
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def convert(adapter_config: bytes, weights: bytes, export: str | Path, out: str | Path) -> Path:
    """Convert a verified PEFT release (its config and safetensors bytes) for the export in ``export``.

    Raises
    ------
    AdapterError
        Why the adapter cannot be served: malformed, a non-finite or huge value, a shape or
        option the graph does not implement.
    """
    from client.verify import check_adapter_values
    from shared.errors import ReleaseError
    from shared.onnx_base import read_export_info
    from shared.tensors import load_arrays

    rank, scale = lora_rank_and_scale(adapter_config)
    try:
        state = load_arrays(weights)
        check_adapter_values(state)
    except (ReleaseError, ValueError) as exc:
        raise AdapterError(str(exc)) from None
    layers = read_export_info(export).layers_json()
    tensors = onnx_lora_tensors(state, scale, layers, read_corrections(export), rank)
    return write_onnx_adapter(tensors, out)


def read_corrections(export: str | Path) -> dict[str, np.ndarray]:
    """Return the per-layer corrections ``C`` of the export in ``export`` (its ``correction.safetensors``)."""
    from safetensors.numpy import load_file

    from shared.onnx_base import CORRECTIONS

    return load_file(str(Path(export) / CORRECTIONS))


def _main(argv: list[str]) -> int:
    """``python -m client.onnx_adapter <export> <out> <config bytes>``: stdin is the config, then the weights."""
    export, out, n = argv[0], argv[1], int(argv[2])
    data = sys.stdin.buffer.read()
    try:
        convert(data[:n], data[n:], export, out)
    except AdapterError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
