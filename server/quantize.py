"""Quantize a base model to the 4-bit artifact devices download once (format: ``shared/int4.py``).

Input: a Hugging Face causal-LM folder (the embedded SmolLM2 once fetched). Output: a folder with

* ``model.int4.safetensors``: every linear layer of the decoder blocks as ``<name>.qweight``
  (uint8 codes, MatMulNBits layout), ``<name>.scales`` and ``<name>.mins`` (fp16); the
  embedding (tied to the output layer) as ``model.embed_tokens.qweight8`` (int8) + ``.scales``;
  every other tensor (norms) as stored;
* ``quantization.json``: the scheme, the block size, the source model's digest, and the list of
  4-bit modules;
* the source's ``config.json``, generation config, tokenizer and chat template, unchanged.

:func:`publish_base` signs it as the ``base`` release of the artifact store; the manifest adds
the SHA-256 of every file. Quantization runs once per source digest: a store whose base was
made from the same source is reused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.int4 import BLOCK, quantize4, quantize8
from shared.int4_layer import INT4_WEIGHTS, QUANT_CONFIG
from shared.manifest import Manifest, parse
from shared.model import model_digest
from shared.progress import Progress
from shared.release import MANIFEST, Release, make_release, read_release, write_release

SCHEME = "fleetlora-int4-b32-asym"
EMBEDDING = "model.embed_tokens.weight"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")  # fmt: skip


def quantize_model(source: str | Path, out: str | Path, source_digest: str) -> dict[str, Any]:
    """Write the 4-bit artifact of the HF folder ``source`` into ``out``; return its quantization.json.

    Reads one tensor at a time, so peak memory is the largest tensor, not the model.
    """
    source, out = Path(source), Path(out)
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    int4: list[str] = []
    names = [(f, k) for f in files for k in safe_open(f, "pt").keys()]  # noqa: SIM118 (safe_open has no __iter__)
    progress = Progress(f"quantize {source.name}", len(names), unit="tensors")
    for i, (path, key) in enumerate(names):
        with safe_open(path, "pt") as f:
            w = f.get_tensor(key)
        if _is_block_linear(key, w):
            module = key[: -len(".weight")]
            tensors[f"{module}.qweight"], tensors[f"{module}.scales"], tensors[f"{module}.mins"] = quantize4(w)
            int4.append(module)
        elif key in (EMBEDDING, "lm_head.weight") and w.shape[-1] % BLOCK == 0:
            stem = key[: -len(".weight")]
            tensors[f"{stem}.qweight8"], tensors[f"{stem}.scales"] = quantize8(w)
        else:
            tensors[key] = w.contiguous()
        progress.update(i + 1)
    progress.close()
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes the metadata map in hash order, and two keys gave two byte layouts
    # of the same weights, i.e. two base digests (a re-quantized base orphaned every device); the scheme is in
    # quantization.json
    save_file(tensors, out / INT4_WEIGHTS, metadata={"format": "pt"})
    for name in _COPY:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    info = {
        "scheme": SCHEME,
        "bits": 4,
        "block_size": BLOCK,
        "layout": "codes (N, K/32, 16) uint8 low nibble first = MatMulNBits B; W = scale * q + min",
        "scale_dtype": "float16",
        "matmulnbits_zero_point": "-min / scale (float)",
        "embedding": {"bits": 8, "block_size": BLOCK, "symmetric": True},
        "source_digest": source_digest,
        "int4_modules": sorted(int4),
    }
    (out / QUANT_CONFIG).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def publish_base(source: str | Path, source_digest: str, store: str | Path, key: Any) -> tuple[Release, Manifest]:
    """Quantize ``source`` (unless the store already holds its base) and sign it as ``<store>/base``."""
    folder = Path(store) / "base"
    if (folder / MANIFEST).is_file():
        try:
            release = read_release(folder)
            info = json.loads(release.files[QUANT_CONFIG])
        except (KeyError, ValueError):  # a ReleaseError too: an older format, a damaged folder
            info = {}  # (or no quantization record): quantized and signed again
        if info.get("source_digest") == source_digest and info.get("scheme") == SCHEME:
            return release, parse(release.manifest_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_model(source, tmp, source_digest)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
        digest = model_digest(tmp)  # what devices compute on the folder they fetch
    release, manifest = make_release(
        files, kind="base", run_id="base", round=0, base_digest=digest, method=SCHEME, key=key
    )
    write_release(release, folder)
    return release, manifest


def _is_block_linear(key: str, w: torch.Tensor) -> bool:
    """Tell whether ``key`` is a decoder block's linear weight (q/k/v/o, gate/up/down) with K % 32 == 0."""
    return ".layers." in key and key.endswith("proj.weight") and w.dim() == 2 and w.shape[1] % BLOCK == 0
