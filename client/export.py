"""Export the device's 4-bit base to an ONNX Runtime model that serves the very codes it trained on.

onnxruntime-genai's model builder lays out the decoder graph (GroupQueryAttention, rotary
caches, KV-cache inputs, ``genai_config.json``, tokenizer files) from a float copy of the base;
we then swap every linear layer and the embedding for our own quantized weights:

* **Linear layers** hold the base's 4-bit codes ``q`` (fp16 scale ``s`` and min ``m`` per block
  of 32 along K, ``W = s*q + m``, see ``shared/int4.py``). ONNX Runtime's fast ``MatMulNBits``
  kernel takes integer zero points only (a float zero point ``-m/s`` falls back to a path ~50x
  slower at decode: measured), so the layer is written as the symmetric kernel plus an exact
  block-sum correction::

      x @ W.T = MatMulNBits(x; q, s)                 # (q - 8) * s, codes untouched
              + blocksum(x) @ (m + 8*s).T            # (..., K/32) @ (K/32, N)

  Algebraically equal to ``s*q + m``; the correction is a (K/32)-wide matmul, ~3% of the layer,
  computed as ``sums(x) @ C`` (the sums of each block of 32 inputs) in the same low-rank branch
  as LoRA (below).
  The builder packs q/k/v into one ``qkv_proj``: their codes are concatenated along N. We pack
  gate and up the same way (``gate_up_proj``, one kernel, one branch, then a ``Split``), and
  write SiLU as one ``QuickGelu(alpha=1)``: ONNX Runtime pays per node at decode.
* **Embedding and output layer** (tied; symmetric 8-bit, ``W = s*q``) become
  ``GatherBlockQuantized`` and an 8-bit ``MatMulNBits`` over one copy of the codes.
* **LoRA** (Hu et al., 2021): for each layer, graph inputs ``<layer>.lora_A`` = ``A`` (K, r)
  and ``<layer>.lora_B`` = ``[C ; B]`` (K/32 + r, N) add correction and update in one branch,
  ``[sums(x) | x @ A] @ [C ; B]``. Their defaults are one zero column and ``[C ; 0]`` (the base
  alone, exact, for plain ONNX Runtime); an adapter file (``client/onnx_adapter.py``) feeds
  them at run time (onnxruntime-genai ``og.Adapters``), so a new adapter never rebuilds the base.
  ``base.onnx_adapter`` holds the base's own; one adapter must always be active under GenAI,
  which feeds empty factors otherwise.

The export is cached under ``<cache>/onnx/<digest>``, keyed by the base's digest and
:data:`EXPORT_VERSION`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.onnx_adapter import base_tensors, write_onnx_adapter
from client.onnx_graph import GraphEditor
from shared.cli import python_module
from shared.int4_layer import INT4_WEIGHTS, QUANT_CONFIG
from shared.model import model_digest
from shared.onnx_base import (
    BASE_ADAPTER,
    CORRECTIONS,
    DONE,
    EXPORT_VERSION,
    GENAI_CONFIG,
    GENERATION_CONFIG,
    ONNX_MODEL,
    ExportError,
    ExportOptions,
)

# The export folder's names and options live in client/onnx_base.py: the edge runtime reads them without torch.
__all__ = [
    "BASE_ADAPTER",
    "CORRECTIONS",
    "DONE",
    "EXPORT_VERSION",
    "ONNX_MODEL",
    "ExportError",
    "ExportOptions",
    "export_base",
    "lora_input_names",
    "register",
]


# builder layer name -> the base's module names whose outputs it concatenates along N
_PACKED: dict[str, tuple[str, ...]] = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
# builder node -> (our layer name, its partner node, the base's modules) for nodes we pack ourselves
_PACKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mlp.gate_proj": ("mlp.gate_up_proj", "mlp.up_proj", ("mlp.gate_proj", "mlp.up_proj"))
}
_PACKED_INTO = {partner for _, partner, _ in _PACKS.values()}  # computed by the node they are packed with
PAGE = 4096  # mapped tensors start on a page
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in model.onnx (onnx's own default threshold)
_LINEAR = re.compile(r"model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight")


def export_base(int4_folder: str | Path, cache: str | Path, options: ExportOptions | None = None) -> Path:
    """Return the ONNX Runtime model folder for the 4-bit base in ``int4_folder``, exporting it once.

    Parameters
    ----------
    int4_folder
        A 4-bit base as the server publishes it (``quantization.json`` + ``model.int4.safetensors``).
    cache
        Folder under which exports are kept, one per base digest and options.
    options
        See :class:`ExportOptions`; the defaults serve exactly the trained weights, fast.
    """
    src = Path(int4_folder)
    if not (src / QUANT_CONFIG).is_file():
        raise ExportError(f"{src} is not a 4-bit base folder (no {QUANT_CONFIG})")
    digest = model_digest(str(src))
    options = options or ExportOptions()
    out = Path(cache) / "onnx" / f"{digest[:32]}-v{EXPORT_VERSION}-{options.key()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:  # one exporter per cache at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / DONE).is_file():
            # in a child process: the float copy and the graph (~1 GB) never stay in the device's memory
            cmd = python_module("client.export", str(src), str(out), json.dumps(asdict(options)))
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not (out / DONE).is_file():
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise ExportError(f"exporting {src} to ONNX failed (exit {done.returncode}):\n{tail}")
    return out


def _export(src: Path, out: Path, options: ExportOptions) -> None:
    """Build the export in a scratch folder next to ``out`` and move it into place when complete."""
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        float_dir, built = work / "float", work / "built"
        _write_float_copy(src, float_dir)
        _run_builder(float_dir, built, work / "hf-cache")
        model, edit = _quantized_graph(built / ONNX_MODEL, src, options)
        lora, corrections = edit.lora, edit.corrections
        final = work / "final"
        final.mkdir()
        _save(model, final / ONNX_MODEL, edit.aliases)
        for f in built.iterdir():
            if f.suffix not in (".onnx", ".data"):
                shutil.copy2(f, final / f.name)
        if (src / GENERATION_CONFIG).is_file():  # the base's own generation settings travel with its ONNX form
            shutil.copy2(src / GENERATION_CONFIG, final / GENERATION_CONFIG)
        _quiet(final / GENAI_CONFIG)
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in corrections.items()}, str(final / CORRECTIONS))
        write_onnx_adapter(base_tensors(corrections), final / BASE_ADAPTER)
        info = {"base_digest": model_digest(str(src)), "export_version": EXPORT_VERSION}
        info.update(options=asdict(options), lora_layers=lora)
        (final / DONE).write_text(json.dumps(info, indent=1, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_float_copy(src: Path, dst: Path) -> None:
    """Dequantize the base into a float HF folder: the builder's input (its weights are then replaced)."""
    from shared.int4_layer import Int4Linear, build_int4_model

    model = build_int4_model(src, torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, Int4Linear):
            parent, _, child = name.rpartition(".")
            weight = module.dequantized(torch.float32)  # (N, K)
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight
            setattr(model.get_submodule(parent), child, linear)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists() and f.name not in (INT4_WEIGHTS, QUANT_CONFIG):
            shutil.copy2(f, dst / f.name)


def _run_builder(float_dir: Path, out: Path, hf_cache: Path) -> None:
    cmd = python_module("onnxruntime_genai.models.builder", "-i", str(float_dir), "-o", str(out))
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(hf_cache)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not (out / ONNX_MODEL).is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise ExportError(f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n{tail}")


def _quantized_graph(built: Path, src: Path, options: ExportOptions) -> tuple[Any, GraphEditor]:
    """Load the builder's float graph and replace its linear layers and embedding with the base's codes.

    Returns the graph and its editor (the LoRA layers, corrections and aliases it added).
    """
    import onnx
    from safetensors.torch import load_file

    model = onnx.load(str(built))
    tensors = load_file(src / INT4_WEIGHTS)
    edit = GraphEditor(model.graph, options.accuracy_level)
    embedding = _embedding_codes(tensors)  # the tied embedding / output layer, used twice below
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    by_weight = {n.input[1]: n for n in matmuls}
    for node in matmuls:
        weight = node.input[1]
        match = _LINEAR.fullmatch(weight)
        if match:
            layer, kind, name = match.groups()
            key = f"{kind}.{name}"
            if key in _PACKED_INTO:
                continue  # computed by the layer it is packed into
            target, nodes = weight.removesuffix(".MatMul.weight"), [node]
            modules = _PACKED.get(key, (f"{'self_attn' if kind == 'attn' else 'mlp'}.{name}",))
            if key in _PACKS:  # gate and up read the same input: one kernel and one branch for both
                packed_name, partner, modules = _PACKS[key]
                other = by_weight.get(f"model.layers.{layer}.{partner}.MatMul.weight")
                if other is None:
                    raise ExportError(f"layer {layer}: {name} without its partner {partner} in the builder's graph")
                target, nodes = f"model.layers.{layer}.{packed_name}", [node, other]
            parts = [f"model.layers.{layer}.{m}" for m in modules]
            codes, scales, mins = (
                torch.cat([tensors[f"{p}.{t}"] for p in parts]) for t in ("qweight", "scales", "mins")
            )
            outs = [int(tensors[f"{p}.qweight"].shape[0]) for p in parts]
            edit.int4_linear(nodes, target, codes.numpy(), scales.float().numpy(), mins.float().numpy(), parts, outs)
        elif weight == "lm_head.MatMul.weight":
            if options.output_bits == 8:
                edit.int8_lm_head(node, *embedding)
            else:
                edit.int4_lm_head(node, *_requantized4(*embedding))
        else:
            raise ExportError(f"unexpected float MatMul {node.name} on {weight}: the export would not be 4-bit")
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.name.startswith("/model/embed_tokens")]
    if len(gathers) != 1:
        raise ExportError(f"expected one embedding Gather in the builder's graph, found {len(gathers)}")
    edit.int8_embedding(gathers[0], *embedding)
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for sigmoid in [n for n in model.graph.node if n.op_type == "Sigmoid"]:  # SiLU = x * Sigmoid(x)
        muls = [m for m in consumers.get(sigmoid.output[0], []) if m.op_type == "Mul"]
        if len(muls) == 1:
            edit.silu(sigmoid, muls[0])  # only if that Mul is x * Sigmoid(x)
    edit.drop_unused()
    return model, edit


def _quiet(genai_config: Path) -> None:
    """Log ONNX Runtime errors only: it warns once per LoRA input that an overridable initializer is not folded."""
    cfg = json.loads(genai_config.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["log_severity_level"] = 3
    genai_config.write_text(json.dumps(cfg, indent=4))


def _embedding_codes(tensors: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Return the tied embedding's 8-bit codes as unsigned (q + 128: the default zero point) and scales."""
    key = "model.embed_tokens"
    if f"{key}.qweight8" not in tensors:
        raise ExportError("the 4-bit base has no 8-bit embedding (model.embed_tokens.qweight8)")
    if "lm_head.qweight8" in tensors or "lm_head.weight" in tensors:
        raise ExportError("an output layer separate from the embedding is not supported yet")
    codes = (tensors[f"{key}.qweight8"].to(torch.int16) + 128).to(torch.uint8)  # (V, K/32, 32)
    return codes.numpy(), tensors[f"{key}.scales"].float().numpy()


def _requantized4(codes8: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-quantize the 8-bit output layer to symmetric 4-bit blocks of 32: codes (V, K/32, 16), scales (V, K/32)."""
    w = (codes8.astype(np.float32) - 128) * scales[..., None]  # (V, K/32, 32), the trained weights
    step = np.abs(w).max(axis=2) / 7
    step[step == 0] = 1.0
    q = (np.clip(np.round(w / step[..., None]), -8, 7) + 8).astype(np.uint8)  # MatMulNBits' zero point is 8
    return q[..., 0::2] | (q[..., 1::2] << 4), step.astype(np.float32)


def _save(model: Any, path: Path, aliases: Mapping[str, tuple[str, list[int]]]) -> None:
    """Write ``model`` to ``path`` and its tensors to ``<path>.data``, each large one at a page-aligned offset.

    ONNX Runtime maps a page-aligned external tensor instead of reading it into memory (the
    ``align_offset`` of its own ``ModelSavingOptions``; onnx's writer does not align): a tensor no
    kernel pre-packs, such as the embedding table, then costs memory only for the pages read.
    ``aliases`` (``{name: (source, dims)}``) become initializers over their source's bytes.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    data = path.name + ".data"
    placed: dict[str, tuple[int, int]] = {}
    with open(path.parent / data, "wb") as f:
        for tensor in model.graph.initializer:
            raw = numpy_helper.to_array(tensor).tobytes() if not tensor.HasField("raw_data") else tensor.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            f.write(b"\0" * (-f.tell() % PAGE if len(raw) >= PAGE else 0))
            placed[tensor.name] = (f.tell(), len(raw))
            f.write(raw)
            name, dims, dtype = tensor.name, list(tensor.dims), tensor.data_type
            tensor.Clear()  # drops float_data / int64_data too
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            _external(tensor, data, *placed[name])
        f.flush()
        os.fsync(f.fileno())
    for name, (source, dims) in aliases.items():
        src = next(t for t in model.graph.initializer if t.name == source)
        alias = TensorProto(name=name, data_type=src.data_type, dims=dims)
        _external(alias, data, *placed[source])
        model.graph.initializer.append(alias)
    onnx.save_model(model, str(path))


def _external(tensor: Any, location: str, offset: int, length: int) -> None:
    """Point ``tensor`` (without data of its own) at ``length`` bytes of ``location`` from ``offset``."""
    from onnx import TensorProto

    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL


def lora_input_names(module: str) -> tuple[str, str]:
    """Graph input names of the LoRA factors of a builder layer (e.g. ``model.layers.0.attn.qkv_proj``)."""
    return f"{module}.lora_A", f"{module}.lora_B"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand: the ONNX base of a signed 4-bit base, for publishing to torch-free devices."""
    p = sub.add_parser("export", help="export a verified 4-bit base release to ONNX Runtime (needs torch)")
    p.add_argument("--base", type=Path, default=Path("outputs/store/base"), help="the signed 4-bit base release")
    p.add_argument("--trust", type=Path, default=Path(".fleetlora/keys/server.key.pub"), help="trust-list file")
    p.add_argument("--cache", type=Path, help="where exports are kept (default: ~/.cache/fleetlora)")
    p.add_argument("--output-bits", type=int, choices=(4, 8), default=8, help="output layer bits (8: exact)")
    p.set_defaults(func=_export_cli)


def _export_cli(args: argparse.Namespace) -> int:
    from shared.model import cache_dir
    from shared.release import read_release, verify_release
    from shared.sign import TrustList

    trust = TrustList.load(args.trust)
    manifest = verify_release(read_release(args.base, trust), trust, None)  # verify before export
    if manifest.kind != "base":
        raise ExportError(f"{args.base} holds a {manifest.kind} release, not a base model")
    folder = export_base(args.base, args.cache or cache_dir(), ExportOptions(output_bits=args.output_bits))
    print(f"{folder}  (ONNX export of base {manifest.base_digest[:16]}…; publish it: fleetlora publish-onnx)")
    return 0


if __name__ == "__main__":  # the child process export_base starts
    _export(Path(sys.argv[1]), Path(sys.argv[2]), ExportOptions(**json.loads(sys.argv[3])))
