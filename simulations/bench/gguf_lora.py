"""A PEFT LoRA adapter folder as a llama.cpp LoRA adapter (GGUF), applied at runtime, not merged.

What llama.cpp's ``convert_lora_to_gguf.py`` does for a Llama model, written with the ``gguf``
package alone (that script is not on PyPI and needs the llama.cpp tree). PEFT computes
``y = W x + (alpha / r) B A x`` with ``lora_A.weight`` A (r, K) and ``lora_B.weight`` B (N, r)
(Hu et al., 2021, arXiv 2106.09685); llama.cpp computes ``y = W x + s (alpha / r) B (A x)`` with
``r`` read from the adapter's own ``lora_a`` and ``s`` the user's scale (1 here). GGUF lists a
tensor's dimensions innermost first, so numpy arrays (r, K) and (N, r) are GGUF ``[K, r]`` and
``[r, N]``: exactly what llama.cpp checks (``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]``,
``a.ne[1] == b.ne[0]``). PEFT's factors are written as they are, except:

* names: ``base_model.model.model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q`` (+ ``.weight.lora_a``
  / ``.weight.lora_b``), and likewise for k, v, o and the MLP's gate, up and down;
* q and k rows: llama.cpp's HF -> GGUF conversion permutes the output rows of q_proj and k_proj
  within each head from rotate-half order (all real parts, then all imaginary parts) to the
  interleaved pairs its RoPE reads (:func:`rope_rows`); ``B`` gets the same row order, or
  ``B A x`` would land on the wrong rotary channels. ``A`` acts on the input side, unchanged;
* alpha: PEFT's scale ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) is written as
  ``adapter.lora.alpha = scale * r``, so that llama.cpp's ``alpha / r`` is PEFT's scale.

Head counts, architecture and the layer shapes come from the base GGUF the adapter will be
applied to; a factor that does not fit its layer is refused here, not at load time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Return the row order llama.cpp gives q_proj / k_proj: ``W_gguf = W_hf[order]``.

    Within each head of ``d = n_rows / n_head`` rows, GGUF row ``2 j + t`` is HF row ``t d/2 + j``
    (t = 0, 1; j < d/2): rotate-half's pair (j, j + d/2) becomes the adjacent pair (2j, 2j + 1).
    """
    if n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of an even size")
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).transpose(0, 2, 1).reshape(-1)


def gguf_lora_tensors(
    modules: dict[str, tuple[np.ndarray, np.ndarray]], n_head: int, n_head_kv: int
) -> dict[str, np.ndarray]:
    """Map ``{PEFT module: (A (r, K), B (N, r))}`` onto llama.cpp's ``blk.N.*.weight.lora_a/_b`` arrays.

    Raises
    ------
    ValueError
        For a module llama.cpp's Llama graph has no LoRA slot for (embeddings, the output layer).
    """
    out: dict[str, np.ndarray] = {}
    for module, (a, b) in sorted(modules.items()):
        match = _MODULE.fullmatch(module)
        if match is None or match[2] not in HF_TO_GGUF:
            raise ValueError(f"adapter module {module!r} has no llama.cpp counterpart (known: {sorted(HF_TO_GGUF)})")
        name = f"blk.{match[1]}.{HF_TO_GGUF[match[2]]}.weight"
        heads = {"attn_q": n_head, "attn_k": n_head_kv}.get(HF_TO_GGUF[match[2]])
        if heads is not None:
            b = b[rope_rows(b.shape[0], heads)]  # (N, r): the base's rows were permuted the same way
        out[f"{name}.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)  # (r, K) = GGUF [K, r]
        out[f"{name}.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)  # (N, r) = GGUF [r, N]
    return out


def write_gguf_lora(adapter: Path, base_gguf: Path, out: Path) -> Path:
    """Convert the PEFT folder ``adapter`` into a llama.cpp LoRA GGUF for ``base_gguf``; return ``out``.

    Written to a temporary name and renamed, so a half-written file is never taken for an adapter.
    """
    import gguf

    from client.onnx_adapter import _by_module, lora_scale  # the one PEFT-config and factor parser
    from shared.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from shared.tensors import load_tensors

    base = gguf.GGUFReader(base_gguf)
    arch = _field(base, "general.architecture")
    n_head = int(_field(base, f"{arch}.attention.head_count"))
    n_head_kv = int(_field(base, f"{arch}.attention.head_count_kv"))
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in base.tensors}  # GGUF order: [K, N]
    config = (adapter / ADAPTER_CONFIG).read_bytes()
    r, scale = int(json.loads(config)["r"]), lora_scale(config)  # lora_scale checked r and refuses patterns
    state = {k: v.float().numpy() for k, v in load_tensors((adapter / ADAPTER_WEIGHTS).read_bytes()).items()}
    tensors = gguf_lora_tensors(_by_module(state), n_head, n_head_kv)
    for weight in {name.rsplit(".", 1)[0] for name in tensors}:
        a, b = tensors[f"{weight}.lora_a"], tensors[f"{weight}.lora_b"]
        k, n = shapes.get(weight, (-1, -1))
        if a.shape[1] != k or b.shape[0] != n:
            raise ValueError(f"{weight}: lora_a {a.shape} / lora_b {b.shape} do not fit the base's {k} -> {n} layer")
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * r)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _field(reader: Any, key: str) -> Any:
    """Return the scalar or string value of GGUF metadata ``key``."""
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"the base GGUF has no {key!r}")
    return field.contents()
