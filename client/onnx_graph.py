"""Graph surgery for the ONNX export: quantized linear layers, quantized embedding, LoRA inputs.

Nodes that replace one node are spliced in at its position, so the graph stays in
topological order. Shapes in comments: x (B, S, K), W (N, K), K/32 blocks per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
BLOCK = 32


class GraphEditor:
    """Collects replacements for nodes of ``graph`` and applies them on :meth:`drop_unused`."""

    def __init__(self, graph: Any, accuracy_level: int = 4) -> None:
        self.graph = graph
        self.accuracy_level = accuracy_level
        self.lora: dict[str, dict[str, Any]] = {}
        """LoRA inputs added, by layer: ``{"in": K, "out": [N of each packed module], "modules": [...]}``."""
        self._splice: dict[str, list[Any]] = {}
        self._blocksums: dict[str, str] = {}

    def int4_linear(
        self, node: Any, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, lora: list[str], outs: list[int]
    ) -> None:
        """Replace float ``MatMul`` ``node`` with ``W = s*q + m`` (codes (N, K/32, 16)) plus a LoRA branch.

        ``y = MatMulNBits(x; q, s) + blocksum(x) @ (m + 8 s).T + x @ A @ B``: the symmetric
        kernel computes ``(q - 8) * s``; the (K/32)-wide correction restores ``+ 8 s + m`` exactly.
        """
        x, y = node.input[0], node.output[0]
        layer = node.input[1].removesuffix(".MatMul.weight")  # e.g. model.layers.0.attn.qkv_proj
        n, kb, _ = codes.shape
        k = kb * BLOCK
        new = self._blocksum(x, kb)
        self._init(f"{layer}.q4", codes)
        self._init(f"{layer}.scales", scales)  # (N, K/32)
        self._init(f"{layer}.correction", np.ascontiguousarray((mins + 8 * scales).T))  # (K/32, N)
        new.append(
            helper.make_node(
                "MatMulNBits", [x, f"{layer}.q4", f"{layer}.scales"], [f"{layer}/base"], name=f"{layer}/MatMulNBits",
                domain=MS, K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=self.accuracy_level,
            )
        )  # fmt: skip
        new.append(helper.make_node("MatMul", [self._blocksums[x], f"{layer}.correction"], [f"{layer}/corr"]))
        new.append(helper.make_node("Add", [f"{layer}/base", f"{layer}/corr"], [f"{layer}/exact"]))
        a, b = f"{layer}.lora_A", f"{layer}.lora_B"
        self._lora_input(a, (k, 0))
        self._lora_input(b, (0, n))
        new.append(helper.make_node("MatMul", [x, a], [f"{layer}/lora_xa"]))  # (B, S, r)
        new.append(helper.make_node("MatMul", [f"{layer}/lora_xa", b], [f"{layer}/lora"]))  # (B, S, N)
        new.append(helper.make_node("Add", [f"{layer}/exact", f"{layer}/lora"], [y]))
        self._splice[node.name] = new
        self.lora[layer] = {"in": k, "out": outs, "modules": lora}

    def int8_lm_head(self, node: Any, codes: np.ndarray, scales: np.ndarray) -> None:
        """Replace the output layer's float ``MatMul`` with an 8-bit ``MatMulNBits`` on the embedding's codes."""
        v, kb, _ = codes.shape
        self._embedding_tensors(codes, scales)
        self._splice[node.name] = [
            helper.make_node(
                "MatMulNBits", [node.input[0], "embed.q8", "embed.scales"], [node.output[0]],
                name="/lm_head/MatMulNBits",
                domain=MS, K=kb * BLOCK, N=v, bits=8, block_size=BLOCK, accuracy_level=self.accuracy_level,
            )
        ]  # fmt: skip

    def int4_lm_head(self, node: Any, codes: np.ndarray, scales: np.ndarray) -> None:
        """Replace the output layer's float ``MatMul`` with a symmetric 4-bit ``MatMulNBits`` (codes (V, K/32, 16))."""
        v, kb, _ = codes.shape
        self._init("lm_head.q4", codes)
        self._init("lm_head.scales", scales)
        self._splice[node.name] = [
            helper.make_node(
                "MatMulNBits", [node.input[0], "lm_head.q4", "lm_head.scales"], [node.output[0]],
                name="/lm_head/MatMulNBits", domain=MS, K=kb * BLOCK, N=v, bits=4, block_size=BLOCK,
                accuracy_level=self.accuracy_level,
            )
        ]  # fmt: skip

    def int8_embedding(self, node: Any, codes: np.ndarray, scales: np.ndarray) -> None:
        """Replace the embedding ``Gather`` with ``GatherBlockQuantized`` over the same 8-bit codes."""
        v, kb, _ = codes.shape
        self._embedding_tensors(codes, scales)
        self._init("embed.shape", np.array([v, kb * BLOCK], dtype=np.int64))
        self._splice[node.name] = [
            helper.make_node("Reshape", ["embed.q8", "embed.shape"], ["embed.q8_rows"]),  # (V, K): one copy of codes
            helper.make_node(
                "GatherBlockQuantized", ["embed.q8_rows", node.input[1], "embed.scales"], [node.output[0]],
                name="/model/embed_tokens/GatherBlockQuantized", domain=MS, bits=8, block_size=BLOCK,
                quantize_axis=1, gather_axis=0,
            ),
        ]  # fmt: skip

    def drop_unused(self) -> None:
        """Apply the replacements, then drop nodes and initializers nothing uses any more."""
        nodes = []
        for node in self.graph.node:
            nodes.extend(self._splice.get(node.name, [node]))
        outputs = {o.name for o in self.graph.output}
        while True:
            used = outputs | {i for n in nodes for i in n.input}
            kept = [n for n in nodes if any(o in used for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        inits = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(inits)

    def _blocksum(self, x: str, kb: int) -> list[Any]:
        """Nodes computing x's per-block sums (B, S, K/32), once per input."""
        if x in self._blocksums:
            return []
        out = f"{x}/blocksum"
        self._blocksums[x] = out
        self._init(f"{x}/blocks_shape", np.array([0, 0, kb, BLOCK], dtype=np.int64))
        self._init(f"{x}/last_axis", np.array([-1], dtype=np.int64))
        return [
            helper.make_node("Reshape", [x, f"{x}/blocks_shape"], [f"{x}/blocks"]),  # (B, S, K/32, 32)
            helper.make_node("ReduceSum", [f"{x}/blocks", f"{x}/last_axis"], [out], keepdims=0),  # (B, S, K/32)
        ]

    def _embedding_tensors(self, codes: np.ndarray, scales: np.ndarray) -> None:
        if not any(i.name == "embed.q8" for i in self.graph.initializer):
            self._init("embed.q8", codes)  # (V, K/32, 32) uint8, q + 128
            self._init("embed.scales", scales)  # (V, K/32)

    def _lora_input(self, name: str, empty: tuple[int, int]) -> None:
        """Add a graph input whose default (an initializer of the same name) is an empty factor: no adapter."""
        dims: list[int | None] = [empty[0] or None, empty[1] or None]
        self.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self._init(name, np.zeros(empty, dtype=np.float32))

    def _init(self, name: str, array: np.ndarray) -> None:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
