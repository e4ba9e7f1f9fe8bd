"""Where the edge model's decode time goes: the exact low-rank branch against ceilings, side by side.

Our export computes each linear layer as ``MatMulNBits(x) + [sums(x) | x @ A] @ [C ; B]``
(``client/onnx_graph.py``): sums(x) are the sums of each block of 32 inputs (Reshape +
ReduceSum), C restores the exact Q4_1 minimum, A and B are the federated LoRA factors. This
benchmark loads, in one process, variants of the same export with the demo's final adapter baked
in as the branch's defaults, and decodes with each in turn (alternating, so machine noise hits all
alike):

- ``ours + adapter``: the export as served (block sums by ``Reshape + ReduceSum``);
- ``block sums by x @ S``: the same numbers with the indicator matmul ``x @ [S | A]`` (S: K x K/32,
  ones where k // 32 == b) in place of the Reshape, ReduceSum and Concat: the export before version 6;
- ``base alone``: the branch carries S and C only (no LoRA columns);
- ``no branch``: the branch removed; inexact (the minimum is lost: its text is garbage), a ceiling;
- ``integer zero points``: the branch removed and MatMulNBits given uint8 zero points (all 8: the
  same numbers as the symmetric kernel) — the speed a base format with integer zero points would
  have (no correction branch), a ceiling;
- ``integer zero points + LoRA``: the same with a LoRA-only branch ``(x @ A) @ B``: that format's
  speed with an adapter (its numbers are not ours: only the speed is the point);
- ``merged``: the adapter merged into the dequantized base (``W + B A``) and re-quantized to 4 bits with
  integer zero points (min/max per block of 32, zero kept representable), no branch: what serving
  without a runtime adapter would cost in accuracy (a second rounding of every weight), at the
  ceiling's speed;
- onnxruntime-genai's own INT4 build of the float model, no adapter.

Each variant's held-out perplexity is measured as the inference benchmark measures it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.bench import Table, register, run_child
from simulations.bench.inference import NEW_TOKENS, THREADS, TRUST, _base_release, _builder_int4, _cache, _demo_release

REPEATS = 10
SPEED_ONLY = ("nobranch", "zeropoints", "zeropoints_lora")  # their numbers are not the model's: no perplexity
VARIANTS = {
    "adapter": "ours + federated adapter (as served)",
    "indicator": "ours + adapter, block sums by an indicator matmul x @ S (export v5)",
    "base": "ours, base alone (exact correction only)",
    "nobranch": "ours, branch removed (inexact ceiling)",
    "zeropoints": "integer zero points, no branch (ceiling of that format)",
    "zeropoints_lora": "integer zero points + LoRA-only branch (that format with an adapter)",
    "merged": "adapter merged into the base, re-quantized to integer zero points, no branch (inexact)",
    "builder": "onnxruntime-genai builder INT4, no adapter",
}


def build_variants() -> dict[str, Path]:
    """Write each variant's model folder under the bench cache; return them by name."""
    import onnx
    from onnx import helper, numpy_helper

    from client.infer import EdgeModel
    from client.onnx_adapter import lora_scale, onnx_lora_tensors, read_corrections
    from shared.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from shared.sign import TrustList
    from shared.tensors import load_arrays

    edge = EdgeModel(_base_release(), TrustList.load(TRUST), _cache(), threads=THREADS)
    release = _demo_release()
    corrections = read_corrections(edge.folder)
    lora = onnx_lora_tensors(
        load_arrays((release / ADAPTER_WEIGHTS).read_bytes()),  # as the device parses it (numpy)
        lora_scale((release / ADAPTER_CONFIG).read_bytes()),
        edge.lora_layers,
        corrections,
    )
    out: dict[str, Path] = {"base": edge.folder, "builder": _builder_int4()}
    for name in ("adapter", "indicator", "nobranch", "zeropoints", "zeropoints_lora", "merged"):
        model = onnx.load(str(edge.folder / "model.onnx"))
        graph = model.graph
        if name == "merged":
            _merge_requantized(graph, lora, corrections, numpy_helper)
            _drop_branch(graph, helper)
        elif name in ("nobranch", "zeropoints"):
            _drop_branch(graph, helper)
        else:
            for init in graph.initializer:
                if init.name in lora:
                    layer, is_a = init.name.rsplit(".", 1)[0], init.name.endswith(".lora_A")
                    value = _branch_value(name, lora[init.name], is_a, corrections[layer].shape[0])
                    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
            if name == "indicator":
                _block_sums_by_indicator(graph, helper)
            if name == "zeropoints_lora":
                _lora_only_branch(graph)
        if name.startswith("zeropoints"):
            _zero_points(graph, numpy_helper)
        folder = _cache() / "branch" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        for f in edge.folder.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy2(f, folder / f.name)
        out[name] = folder
    return out


def _branch_value(variant: str, value: np.ndarray, is_a: bool, blocks: int) -> np.ndarray:
    """Return the branch input of ``variant`` from ``A`` (``is_a``) or ``[C ; B]``; ``blocks`` = K/32."""
    if variant == "indicator" and is_a:
        indicator = np.kron(np.eye(blocks, dtype=np.float32), np.ones((32, 1), np.float32))  # S (K, K/32)
        return np.concatenate([indicator, value], axis=1)  # [S | A]
    if variant == "zeropoints_lora" and not is_a:
        return value[blocks:]  # LoRA only, no correction
    return value


def _zero_points(graph: Any, numpy_helper: Any) -> None:
    """Give every 4-bit MatMulNBits (not the output layer) uint8 zero points of 8, packed two per byte."""
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 3 or "lm_head" in node.name:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") != 4:
            continue
        per_row = (attrs["K"] // attrs["block_size"] + 1) // 2
        zero_points = np.full(attrs["N"] * per_row, 0x88, dtype=np.uint8)
        graph.initializer.append(numpy_helper.from_array(zero_points, f"{node.name}.zero_points"))
        node.input.append(f"{node.name}.zero_points")


def _merge_requantized(
    graph: Any, lora: dict[str, np.ndarray], corrections: dict[str, np.ndarray], numpy_helper: Any
) -> None:
    """Merge each layer's LoRA into ``W = s q + m`` and re-quantize it to codes, scales and uint8 zero points."""
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for layer, correction in corrections.items():
        packed = numpy_helper.to_array(inits[f"{layer}.q4"])  # (N, K/32, 16), low nibble first
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], 32).astype(np.float32)
        scales = numpy_helper.to_array(inits[f"{layer}.scales"]).astype(np.float32)  # (N, K/32)
        mins = correction.T - 8 * scales  # C = (m + 8 s).T
        n, kb, _ = codes.shape
        a, b = lora[f"{layer}.lora_A"], lora[f"{layer}.lora_B"][kb:]  # [C ; B]: B after the K/32 rows of C
        w = codes * scales[..., None] + mins[..., None] + (a @ b).T.reshape(n, kb, 32)
        lo, hi = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
        step = np.where(hi > lo, (hi - lo) / 15, 1).astype(np.float32)
        zero = np.clip(np.round(-lo / step), 0, 15)
        q = np.clip(np.round(w / step[..., None] + zero[..., None]), 0, 15).astype(np.uint8)
        zero8 = np.concatenate([zero, np.zeros((n, kb % 2))], axis=1).astype(np.uint8)  # packed two per byte
        for name, value in (
            (f"{layer}.q4", q[..., 0::2] | (q[..., 1::2] << 4)),
            (f"{layer}.scales", step),
            (f"{layer}.zero_points", (zero8[:, 0::2] | (zero8[:, 1::2] << 4)).reshape(-1)),
        ):
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            else:
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        nodes[f"{layer}/MatMulNBits"].input.append(f"{layer}.zero_points")


def _block_sums_by_indicator(graph: Any, helper: Any) -> None:
    """``Concat(ReduceSum(Reshape(x)), x @ A)`` → ``x @ [S | A]`` (the A input then holds ``[S | A]``)."""
    nodes = []
    for node in graph.node:
        if node.name.endswith(("/blocks", "/sums", "/concat")):
            continue
        if node.name.endswith("/lowrank_A"):
            layer = node.name[: -len("/lowrank_A")]
            node = helper.make_node("MatMul", list(node.input), [f"{layer}/xa"], name=node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _lora_only_branch(graph: Any) -> None:
    """``[sums(x) | x @ A] @ B'`` → ``(x @ A) @ B``: no block sums (B' then holds B alone)."""
    nodes = [n for n in graph.node if not n.name.endswith(("/blocks", "/sums", "/concat"))]
    for node in nodes:
        if node.name.endswith("/lowrank_B"):
            node.input[0] = node.name[: -len("/lowrank_B")] + "/xl"
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_branch(graph: Any, helper: Any) -> None:
    nodes = []
    for node in graph.node:
        if "/lowrank" in node.name or node.name.endswith(("/blocks", "/sums", "/concat")):
            continue
        if node.name.endswith("/add") and node.input[1].endswith("/lowrank"):
            node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    branch = (".lora_A", ".lora_B")
    kept_inputs = [i for i in graph.input if not i.name.endswith(branch)]
    kept_inits = [i for i in graph.initializer if not i.name.endswith(branch)]
    del graph.input[:], graph.initializer[:]
    graph.input.extend(kept_inputs)
    graph.initializer.extend(kept_inits)


def measure(folders: dict[str, Path]) -> dict[str, Any]:
    """Decode ``NEW_TOKENS`` greedily with each model in turn, ``REPEATS`` rounds; medians and first tokens."""
    import onnxruntime_genai as og

    from shared.model import load_tokenizer
    from simulations.bench.inference import _onnx_nll, _threads

    models = {name: og.Model(_threads(og, folder)) for name, folder in folders.items()}
    ids = list(range(1000, 1035))
    speeds: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    for _ in range(REPEATS):
        for name, model in models.items():
            params = og.GeneratorParams(model)
            n = len(ids) + NEW_TOKENS
            params.set_search_options(max_length=n, min_length=n, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(ids)
            t0, k = time.perf_counter(), 0
            while not gen.is_done():
                gen.generate_next_token()
                k += 1
            speeds[name].append(k / (time.perf_counter() - t0))
            tokens[name] = [int(t) for t in gen.get_sequence(0)[len(ids) :]]
    del models
    tok = load_tokenizer("smollm2-135m-instruct")
    ppl = {name: _onnx_nll(folder, tok, None) for name, folder in folders.items() if name not in SPEED_ONLY}
    return {"decode": {n: statistics.median(v) for n, v in speeds.items()}, "tokens": tokens, "ppl": ppl}


@register("branch")
def bench() -> Table:
    """Build the variants, then time them in one child process."""
    folders = build_variants()
    load_before = os.getloadavg()[0]
    res = run_child("simulations.bench.branch", json.dumps({n: str(f) for n, f in folders.items()}))
    load_after = os.getloadavg()[0]
    decode, tokens, ppl = res["decode"], res["tokens"], res["ppl"]
    table = Table(
        "Edge decode: the exact low-rank branch against its ceilings (one process, alternating)",
        "python -m simulations.bench --only branch",
        ["variant", "decode tok/s", "× ours + adapter", "greedy tokens = ours + adapter", "held-out ppl"],
    )
    for name, label in VARIANTS.items():
        same = "yes" if tokens[name] == tokens["adapter"] else "no"
        speed = [f"{decode[name]:.1f}", f"{decode[name] / decode['adapter']:.2f}"]
        table.rows.append([label, *speed, same, f"{ppl[name]:.4f}" if name in ppl else "-"])
    table.notes += [
        f"{THREADS} threads; {NEW_TOKENS} new tokens after a 35-token prompt; the {len(VARIANTS)} models are loaded"
        f" together and decode in turn, {REPEATS} rounds, medians: the speed of the shared machine drifts between"
        " runs (ours + adapter measured 84-117 tok/s in three runs within minutes), the ratios are the point.",
        "adapter: the demo's final signed adapter, baked into each variant as the branch inputs' defaults.",
        "held-out ppl: as in the inference benchmark (32 held-out examples, response tokens); its PyTorch float32"
        " references are ~6.24 with this adapter and ~35.8 without (adapters are baked in as the inputs' defaults).",
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (2 cores).",
    ]
    return table


if __name__ == "__main__":
    print(json.dumps(measure({n: Path(f) for n, f in json.loads(sys.argv[1]).items()})))
