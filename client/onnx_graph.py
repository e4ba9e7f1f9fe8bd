"""Graph surgery for the ONNX export: quantized linear layers, quantized embedding, LoRA inputs.

Nodes that replace one node are spliced in at its position, so the graph stays in
topological order. Shapes in comments: x (B, S, K), W (N, K), K/32 blocks per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from client.onnx_adapter import BLOCK

MS = "com.microsoft"
LAST_AXIS = "branch.last_axis"  # ReduceSum's axes input


class GraphEditor:
    """Collects replacements for nodes of ``graph`` and applies them on :meth:`drop_unused`."""

    def __init__(self, graph: Any, accuracy_level: int = 4) -> None:
        self.graph = graph
        self.accuracy_level = accuracy_level
        self.lora: dict[str, dict[str, Any]] = {}
        """LoRA inputs added, by layer: ``{"in": K, "out": [N of each packed module], "modules": [...]}``."""
        self.corrections: dict[str, np.ndarray] = {}
        """Per layer, ``C = (m + 8 s).T`` (K/32, N): the exact correction, which every adapter file carries."""
        self.aliases: dict[str, tuple[str, list[int]]] = {}
        """Initializers that are another one's bytes in another shape: ``{name: (source, dims)}`` (see ``_save``)."""
        self._splice: dict[str, list[Any]] = {}

    def int4_linear(
        self,
        nodes: list[Any],
        layer: str,
        codes: np.ndarray,
        scales: np.ndarray,
        mins: np.ndarray,
        lora: list[str],
        outs: list[int],
    ) -> None:
        """Replace float ``MatMul`` ``nodes`` (one, or several on the same input: packed along N) with one layer.

        ``W = s*q + m`` (codes (N, K/32, 16)) becomes ``y = MatMulNBits(x; q, s) + [sums(x) | x @ A] @ B'``.
        The symmetric kernel computes ``(q - 8) * s``; the low-rank branch carries both the exact
        correction and the LoRA update::

            sums(x)  (B, S, K/32): the sum of each block of 32 inputs (Reshape + ReduceSum)
            A        (K, r)        the LoRA factor
            B' = [C ; B]   (K/32 + r, N),   C = (m + 8 s).T

        ``A``, ``B'`` are graph inputs whose defaults are one zero column and ``[C ; 0]`` (the base
        alone, exact); an adapter file (``client/onnx_adapter.py``) supplies them with its LoRA
        factors. One branch instead of two keeps the node count (ONNX Runtime's per-node cost) down;
        for the same reason several nodes on one input (gate and up) share one kernel and one
        branch, and a ``Split`` along N hands each its own output. The block sums are computed, not
        an indicator matmul ``x @ S``: S (K x K/32, mostly zeros) would travel in every adapter file.
        """
        x = nodes[0].input[0]
        if any(n.input[0] != x for n in nodes):
            raise ValueError(f"{layer}: packed MatMul nodes must share their input")
        n, kb, _ = codes.shape
        k = kb * BLOCK
        self._init(f"{layer}.q4", codes)
        self._init(f"{layer}.scales", scales)  # (N, K/32)
        self._init(f"{layer}.blocks", np.array([0, 0, kb, BLOCK], dtype=np.int64))  # (B, S, K) -> (B, S, K/32, 32)
        if not any(i.name == LAST_AXIS for i in self.graph.initializer):
            self._init(LAST_AXIS, np.array([-1], dtype=np.int64))
        correction = np.ascontiguousarray((mins + 8 * scales).T)  # (K/32, N)
        a, b = f"{layer}.lora_A", f"{layer}.lora_B"
        self._branch_input(a, np.zeros((k, 1), np.float32), (k, None))
        self._branch_input(b, np.concatenate([correction, np.zeros((1, n), np.float32)]), (None, n))
        y = nodes[0].output[0] if len(nodes) == 1 else f"{layer}/output"
        ops = [
            helper.make_node(
                "MatMulNBits", [x, f"{layer}.q4", f"{layer}.scales"], [f"{layer}/base"], name=f"{layer}/MatMulNBits",
                domain=MS, K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=self.accuracy_level,
            ),
            helper.make_node("Reshape", [x, f"{layer}.blocks"], [f"{layer}/xb"], name=f"{layer}/blocks"),
            helper.make_node(
                "ReduceSum", [f"{layer}/xb", LAST_AXIS], [f"{layer}/xs"], name=f"{layer}/sums", keepdims=0
            ),
            helper.make_node("MatMul", [x, a], [f"{layer}/xl"], name=f"{layer}/lowrank_A"),  # (B, S, r)
            helper.make_node(
                "Concat", [f"{layer}/xs", f"{layer}/xl"], [f"{layer}/xa"], name=f"{layer}/concat", axis=-1
            ),
            helper.make_node("MatMul", [f"{layer}/xa", b], [f"{layer}/lowrank"], name=f"{layer}/lowrank_B"),  # (B,S,N)
            helper.make_node("Add", [f"{layer}/base", f"{layer}/lowrank"], [y], name=f"{layer}/add"),
        ]  # fmt: skip
        if len(nodes) > 1:
            self._init(f"{layer}.split", np.array(outs, dtype=np.int64))
            outputs = [node.output[0] for node in nodes]
            ops.append(helper.make_node("Split", [y, f"{layer}.split"], outputs, name=f"{layer}/split", axis=-1))
        self._splice[nodes[0].name] = ops
        for node in nodes[1:]:
            self._splice[node.name] = []  # computed above, at the first node's place (same input: already there)
        self.lora[layer] = {"in": k, "out": outs, "modules": lora}
        self.corrections[layer] = correction

    def silu(self, sigmoid: Any, mul: Any) -> bool:
        """Replace ``x * Sigmoid(x)`` (two nodes) with ``QuickGelu(x, alpha=1)``, the same function in one node.

        Returns False, changing nothing, if ``mul`` multiplies the sigmoid by anything but its own input.
        """
        x = sigmoid.input[0]
        if sorted(mul.input) != sorted([x, sigmoid.output[0]]):
            return False
        self._splice[sigmoid.name] = [
            helper.make_node("QuickGelu", [x], [mul.output[0]], name=f"{sigmoid.name}/QuickGelu", domain=MS, alpha=1.0)
        ]
        self._splice[mul.name] = []
        return True

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
        """Replace the embedding ``Gather`` with ``GatherBlockQuantized`` over the same 8-bit codes.

        It reads the codes as (V, K) rows: ``embed.q8_rows``, an alias of ``embed.q8``'s bytes in the
        saved file (one copy on disk). ONNX Runtime maps the file rather than copying it, so only the
        rows of tokens seen are ever in memory; a ``Reshape`` node here would be constant-folded into
        a second 28 MB copy of the table held in memory.
        """
        v, kb, _ = codes.shape
        self._embedding_tensors(codes, scales)
        self.aliases["embed.q8_rows"] = ("embed.q8", [v, kb * BLOCK])
        self._splice[node.name] = [
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
            used |= {source for name, (source, _) in self.aliases.items() if name in used}
            kept = [n for n in nodes if any(o in used for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        inits = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(inits)

    def _embedding_tensors(self, codes: np.ndarray, scales: np.ndarray) -> None:
        if not any(i.name == "embed.q8" for i in self.graph.initializer):
            self._init("embed.q8", codes)  # (V, K/32, 32) uint8, q + 128
            self._init("embed.scales", scales)  # (V, K/32)

    def _branch_input(self, name: str, default: np.ndarray, dims: tuple[int | None, int | None]) -> None:
        """Add a graph input whose default is an initializer of the same name (overridable per run)."""
        self.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))
        self._init(name, default.astype(np.float32))

    def _init(self, name: str, array: np.ndarray) -> None:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
