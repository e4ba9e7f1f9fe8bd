"""The exported ONNX base as a folder: its file names, its options and its parsed ``export.json``.

An export (``client/export.py``, which needs torch and onnxruntime-genai's builder) is one flat
folder::

    model.onnx, model.onnx.data       the decoder graph on the base's very 4-bit codes
    genai_config.json, tokenizer files  what onnxruntime-genai loads (its tokenizer too)
    generation_config.json            the base's own generation settings, if it has them
    correction.safetensors            per layer C = (m + 8 s).T: every adapter file carries it
    base.onnx_adapter                 the base alone (exact); active when no federated adapter is
    export.json                       base digest, export version, options, the LoRA layers

The coordinator can publish that folder as a signed base release of its own (``server/onnx_release.py``,
run id :data:`RUN_ID`), which an inference-only device (``fleetlora[edge]``: no torch) fetches
and verifies like any release and loads as it is. This module is what both sides read, and it
imports neither torch nor onnx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.files import read_bounded

EXPORT_VERSION = 6
"""Bump when the exported graph or folder changes: old cached exports are then rebuilt.

5: generation_config.json; 6: page-aligned tensors, the embedding mapped from disk, block sums
computed (no indicator S in the adapter files)."""
ONNX_MODEL = "model.onnx"
DONE = "export.json"
CORRECTIONS = "correction.safetensors"
BASE_ADAPTER = "base.onnx_adapter"
GENAI_CONFIG = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"  # the base's own generation settings (client/generation.py)
RUN_ID = "onnx"
"""Run id (and store folder) of the ONNX base release; the 4-bit base's is ``base``."""
MAX_INFO_BYTES = 1 << 20  # export.json lists a few hundred layers
MAX_LAYERS = 4096
MAX_DIM = 1 << 20


class ExportError(RuntimeError):
    """The base cannot be exported (unsupported layout, builder failure), or an export is not usable."""


@dataclass(frozen=True)
class ExportOptions:
    """How the base is exported; each combination is cached separately."""

    accuracy_level: int = 4
    """``MatMulNBits`` compute: 4 = int8 activations (ONNX Runtime's fast CPU path, the default),
    0 = float32 activations (several times slower; what the exactness tests use)."""
    output_bits: int = 8
    """The output layer: 8 = the tied embedding's own 8-bit codes (what the device trained with:
    exact, the default); 4 = re-quantized to symmetric 4-bit blocks of 32 (faster decode, not
    the trained weights: the inference benchmark reports the cost)."""

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level {self.accuracy_level} is not one of MatMulNBits' 0..4")
        if self.output_bits not in (4, 8):
            raise ExportError(f"output_bits {self.output_bits} is not 4 or 8")

    def key(self) -> str:
        """Return the part of the cache folder's name that names these options."""
        return f"acc{self.accuracy_level}-out{self.output_bits}"


@dataclass(frozen=True)
class LoraLayer:
    """One graph layer's LoRA inputs: its input width and the base modules (and their widths) it packs."""

    inputs: int
    modules: tuple[str, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class ExportInfo:
    """``export.json``, parsed: which base it serves, how it was exported, and its LoRA layers."""

    base_digest: str
    export_version: int
    options: ExportOptions
    lora_layers: Mapping[str, LoraLayer]

    def layers_json(self) -> dict[str, dict[str, Any]]:
        """Return the LoRA layers in ``export.json``'s own form (what ``client/onnx_adapter.py`` takes)."""
        return {
            name: {"in": layer.inputs, "modules": list(layer.modules), "out": list(layer.outputs)}
            for name, layer in self.lora_layers.items()
        }


def is_onnx_base(files: Mapping[str, Any] | set[str]) -> bool:
    """Tell whether a release's files are an ONNX export (rather than the 4-bit safetensors base)."""
    return all(name in files for name in (DONE, ONNX_MODEL, GENAI_CONFIG, CORRECTIONS, BASE_ADAPTER))


def read_export_info(folder: str | Path) -> ExportInfo:
    """Parse ``<folder>/export.json`` strictly into an :class:`ExportInfo`.

    Raises
    ------
    ExportError
        Naming the field that is missing, of the wrong type or out of bounds.
    """
    path = Path(folder) / DONE
    try:
        raw = json.loads(read_bounded(path, MAX_INFO_BYTES))
    except (OSError, ValueError, RecursionError) as exc:
        raise ExportError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path} is not a JSON object")
    digest, version, options, layers = (raw.get(k) for k in ("base_digest", "export_version", "options", "lora_layers"))
    if not isinstance(digest, str) or len(digest) != 64:
        raise ExportError(f"{path}: base_digest is not a SHA-256 hex digest")
    if version != EXPORT_VERSION:
        raise ExportError(f"{path}: export version {version!r}, this device serves version {EXPORT_VERSION}")
    if not isinstance(options, dict) or set(options) != {"accuracy_level", "output_bits"}:
        raise ExportError(f"{path}: options must name accuracy_level and output_bits")
    if not all(type(v) is int for v in options.values()):
        raise ExportError(f"{path}: options must be integers")
    if not isinstance(layers, dict) or not 0 < len(layers) <= MAX_LAYERS:
        raise ExportError(f"{path}: lora_layers must map 1..{MAX_LAYERS} layers")
    return ExportInfo(digest, version, ExportOptions(**options), {n: _layer(path, n, v) for n, v in layers.items()})


def _layer(path: Path, name: str, value: Any) -> LoraLayer:
    """Parse one ``lora_layers`` entry: ``{"in": K, "modules": [...], "out": [N, ...]}``."""
    if not isinstance(value, dict) or set(value) != {"in", "modules", "out"}:
        raise ExportError(f"{path}: layer {name!r} must hold exactly in, modules and out")
    k, modules, outs = value["in"], value["modules"], value["out"]
    if type(k) is not int or not 0 < k <= MAX_DIM or k % 32:
        raise ExportError(f"{path}: layer {name!r} has input width {k!r} (a multiple of 32 up to {MAX_DIM})")
    if not isinstance(modules, list) or not isinstance(outs, list) or not 0 < len(modules) == len(outs) <= 8:
        raise ExportError(f"{path}: layer {name!r} needs 1..8 modules, one output width each")
    if not all(isinstance(m, str) and 0 < len(m) <= 256 for m in modules):
        raise ExportError(f"{path}: layer {name!r} has a module name that is not a short string")
    if not all(type(n) is int and 0 < n <= MAX_DIM for n in outs):
        raise ExportError(f"{path}: layer {name!r} has an output width out of 1..{MAX_DIM}")
    return LoraLayer(k, tuple(modules), tuple(outs))
