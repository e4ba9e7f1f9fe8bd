"""On-device inference: the 4-bit base in ONNX Runtime, with the latest verified federated adapter.

:class:`EdgeModel` verifies the signed base and loads its ONNX form with onnxruntime-genai:
either the coordinator's signed ONNX base release (``server/onnx_release.py``), loaded as it was
verified, or the 4-bit base, exported once here (``client/export.py``, which needs torch).
:meth:`EdgeModel.apply_release` verifies a signed adapter release (signature, file hashes, base
digest, not older than the active one, finite values), converts it to an ``.onnx_adapter`` file
and makes it active; the base is never rebuilt, and any failure leaves the previous adapter active.
:meth:`EdgeModel.generate` streams a greedy answer to a chat prompt, with or without the adapter,
with repetition control (``client/generation.py``).

This path imports neither torch nor transformers (``fleetlora[edge]`` installs neither): the
adapter is parsed with safetensors' numpy API, converted in numpy, and the prompt is put in the
model's chat template by onnxruntime-genai's own tokenizer (a test checks both facts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.generation import GenerationOptions, model_defaults
from client.residency import release_model_pages
from shared.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from shared.cli import python_module
from shared.errors import ReleaseError
from shared.files import read_bounded
from shared.manifest import Manifest, read_manifest
from shared.onnx_base import BASE_ADAPTER, ExportError, ExportOptions, is_onnx_base, read_export_info
from shared.release import MANIFEST, read_release, verify_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList
from shared.text import printable

log = logging.getLogger(__name__)
BASE = "base"  # the adapter name of the base alone
CHAT_TEMPLATE = "chat_template.jinja"  # where transformers saves the model's chat template
MAX_TEMPLATE_BYTES = 1 << 16
CONVERT_TIMEOUT_S = 600  # converting one adapter (a child process; ~1 s for SmolLM2 r = 8)
MAX_REASON = 500  # characters of the child's refusal reported


@dataclass(frozen=True)
class ActiveAdapter:
    """The adapter in use: its ONNX Runtime name and the signed manifest it came from."""

    name: str
    manifest: Manifest


def _convert(cmd: list[str], config: bytes, weights: bytes) -> tuple[int, str]:
    """Run the conversion child on the verified bytes; return its exit code and its last line of stderr.

    That line is escaped and at most ``MAX_REASON`` characters. The bytes go to its stdin one after
    the other (not joined into a second copy), its stderr to a file of which only the end is read:
    the serving process holds neither twice, whatever the child says.

    Raises
    ------
    ReleaseError
        The child took longer than ``CONVERT_TIMEOUT_S`` (it is killed).
    """
    late = threading.Event()

    def kill() -> None:
        late.set()
        child.kill()

    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(CONVERT_TIMEOUT_S, kill)  # also ends a write the child never reads
        timer.start()
        try:
            assert child.stdin is not None
            with contextlib.suppress(BrokenPipeError), child.stdin:  # ended early: its exit code says why
                child.stdin.write(config)  # the verified bytes themselves, not the files again
                child.stdin.write(weights)
            code = child.wait()
        finally:
            timer.cancel()
        if late.is_set():
            raise ReleaseError(f"converting the adapter took longer than {CONVERT_TIMEOUT_S} s")
        err.seek(max(0, err.seek(0, os.SEEK_END) - 4 * MAX_REASON))
        tail = err.read().decode(errors="replace").strip().splitlines()
    return code, printable(tail[-1] if tail else "", MAX_REASON)


class EdgeModel:
    """The exported 4-bit base in ONNX Runtime plus at most one active adapter.

    Parameters
    ----------
    base_folder
        A signed base release: the ONNX base (``fleetlora fetch onnx``; needs no torch) or the
        4-bit base (``fleetlora fetch base``), exported here once.
    trust
        Keys the device trusts for the base and for adapter releases.
    cache
        Where exports and converted adapters are kept.
    threads
        Intra-op threads for ONNX Runtime (0 = one per core).
    options
        How a 4-bit base is exported (``ExportOptions``; default: exact, fast). An ONNX base release
        was exported by its publisher: options that differ from its own are refused.
    accepted
        The device's replay store (``shared/replay.py``): the base and every adapter applied are
        checked against it and recorded, so no session goes back to an older release. None:
        only this session's active adapter is compared against.
    adapter
        An adapter release to verify, convert and make active (as :meth:`apply_release`) before the
        model loads: the conversion's child process has ended before the model takes its memory,
        so the device never holds both.
    """

    def __init__(
        self,
        base_folder: str | Path,
        trust: TrustList,
        cache: str | Path,
        threads: int = 0,
        options: ExportOptions | None = None,
        accepted: AcceptedReleases | None = None,
        adapter: str | Path | None = None,
    ) -> None:
        import onnxruntime_genai as og

        base = read_release(base_folder, trust)  # signature first: an unsigned base is never read whole
        manifest = verify_release(base, trust, None, accepted)
        del base  # the verified bytes: not kept while the model loads
        if manifest.kind != "base":
            raise ReleaseError(f"{base_folder} holds a {manifest.kind} release, not a base model")
        self.accepted = accepted
        if accepted is not None:
            accepted.accept(manifest)  # pins the base: a different one is refused from now on
        self.base_digest = manifest.base_digest
        self.trust = trust
        self.folder = _onnx_folder(Path(base_folder), manifest, Path(cache), options)
        info = read_export_info(self.folder)
        if info.base_digest != manifest.base_digest:
            raise ReleaseError(f"{self.folder} serves base {info.base_digest[:16]}…, its release names another")
        self.lora_layers = info.layers_json()
        self._adapter_dir = Path(cache) / "onnx-adapters"
        self.active: ActiveAdapter | None = None
        self._refused: dict[str, str] = {}  # manifest digest -> why its verified content cannot be served
        try:
            first = self._prepare(adapter) if adapter is not None else None
        except (ReleaseError, OSError) as exc:
            raise ReleaseError(f"adapter {adapter} refused: {exc}") from None
        config = og.Config(str(self.folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.chat_template = _chat_template(self.folder)  # the model's own, as in training
        self.adapters = og.Adapters(self.model)
        self._base_loaded = False  # the base's own adapter is loaded when a generation first needs it
        self.generation = model_defaults(base_folder)  # the signed base's own generation settings, if any
        self._lock = threading.Lock()  # apply_release may run while another thread generates
        if first is not None and first[1] is not None:
            self._activate(first[0], first[1])
        release_model_pages(self.folder)  # the scales MatMulNBits packed at load: mapped, never read again

    def apply_release(self, folder: str | Path) -> Manifest:
        """Verify the adapter release in ``folder`` and make it the active adapter.

        Raises
        ------
        ReleaseError
            Naming the failed check (signature, hash, base, older than the active adapter) or
            why the adapter does not fit the exported model; the active adapter is unchanged.
        """
        manifest, path = self._prepare(folder)
        if path is not None:
            self._activate(manifest, path)
        return manifest

    def adapter_name(self, adapter: bool = True) -> str:
        """Return the ONNX Runtime adapter a generation sets: the active one, or the base's own (loaded once)."""
        with self._lock:
            return self._adapter_name(adapter)

    def _adapter_name(self, adapter: bool) -> str:
        """:meth:`adapter_name`, with ``_lock`` held by the caller."""
        if adapter and self.active:
            return self.active.name
        if not self._base_loaded:
            self.adapters.load(str(self.folder / BASE_ADAPTER), BASE)  # the exact correction, no LoRA
            self._base_loaded = True
        return BASE

    def _prepare(self, folder: str | Path) -> tuple[Manifest, Path | None]:
        """Verify the adapter release in ``folder`` and write its ``.onnx_adapter`` file; record it as accepted.

        Returns its manifest and the file (None: it is the active adapter already).
        """
        active, digest = self.active, _manifest_digest(Path(folder))
        if active is not None and digest == active.manifest.digest():
            return active.manifest, None  # verified when it was applied; `infer` follows LATEST before each prompt
        if digest in self._refused:  # these very manifest bytes: their hashed files convert or load no better now
            raise ReleaseError(f"{self._refused[digest]} (refused before in this session)")
        release = read_release(folder, self.trust)
        manifest = verify_release(release, self.trust, self.base_digest, self.accepted)
        if manifest.kind != "adapter":
            raise ReleaseError(f"{folder} holds a {manifest.kind} release, not an adapter")
        active = self.active
        if active and active.manifest.run_id == manifest.run_id and manifest.round < active.manifest.round:
            raise ReleaseError(
                f"round {manifest.round} of run {manifest.run_id} is older than the active round "
                f"{active.manifest.round}"
            )
        if active and active.manifest.digest() == manifest.digest():
            return manifest, None
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if name not in release.files:
                raise ReleaseError(f"adapter release has no {name}")
        path = self._adapter_dir / f"{manifest.digest()[:32]}.onnx_adapter"
        self._adapter_dir.mkdir(parents=True, exist_ok=True)
        config = release.files[ADAPTER_CONFIG]
        cmd = python_module("client.onnx_adapter", str(self.folder), str(path), str(len(config)))
        code, reason = _convert(cmd, config, release.files[ADAPTER_WEIGHTS])
        if code == 2:  # the child's refusal (client.onnx_adapter._main): of the verified content, so for good
            self._refused[manifest.digest()] = f"the adapter does not fit the exported model: {reason}"
            raise ReleaseError(self._refused[manifest.digest()])
        if code != 0:
            raise ReleaseError(f"converting the adapter failed (exit {code}): {reason}")
        if self.accepted is not None:
            self.accepted.accept(manifest)  # recorded before it is used: a restart never goes back
        return manifest, path

    def _activate(self, manifest: Manifest, path: Path) -> None:
        """Load the converted adapter at ``path`` and make it the active one (the previous one is unloaded)."""
        name = manifest.digest()
        with self._lock:
            active = self.active
            try:
                self.adapters.load(str(path), name)
            except RuntimeError as exc:  # onnxruntime-genai's error (the file, its shapes, memory): a refusal
                why = printable(exc, 300)  # not remembered: memory may be what it lacked
                raise ReleaseError(f"ONNX Runtime could not load the converted adapter: {why}") from None
            self.active = ActiveAdapter(name, manifest)
            if active:
                self.adapters.unload(active.name)
        log.info("adapter of run %s round %d active (manifest %s)", manifest.run_id, manifest.round, name[:16])

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as a user turn in the model's chat template, ready for the answer."""
        messages = json.dumps([{"role": "user", "content": prompt}])
        text = self.tokenizer.apply_chat_template(messages, template_str=self.chat_template, add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(text)]

    def generate(
        self, prompt: str, max_new_tokens: int = 128, adapter: bool = True, options: GenerationOptions | None = None
    ) -> Iterator[str]:
        """Stream the answer to ``prompt`` as text pieces; ``adapter=False`` uses the base alone.

        ``options`` (``client/generation.py``) default to :attr:`generation`, the model's own
        defaults; ``max_new_tokens`` then bounds the answer.
        """
        chosen = options or replace(self.generation, max_new_tokens=max_new_tokens)
        for piece, _ in self.generate_tokens(self.prompt_ids(prompt), chosen.max_new_tokens, adapter, chosen):
            yield piece

    def generate_tokens(
        self, ids: list[int], max_new_tokens: int, adapter: bool = True, options: GenerationOptions | None = None
    ) -> Iterator[tuple[str, int]]:
        """Greedy decoding from token ids: yields (text piece, token id) until end of turn or the limit.

        Without ``options``, plain greedy (no repetition control): what the benchmarks time.
        """
        plain = GenerationOptions(max_new_tokens, repetition_penalty=1.0, no_repeat_ngram_size=0)
        gen = self._generator(ids, options or plain, adapter)
        stream = self.tokenizer.create_stream()
        while not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            yield stream.decode(token), token

    def logits(self, ids: list[int], adapter: bool = True) -> Any:
        """Next-token logits after ``ids`` (numpy, vocabulary-sized)."""
        import numpy as np

        plain = GenerationOptions(1, repetition_penalty=1.0, no_repeat_ngram_size=0)
        return np.asarray(self._generator(ids, plain, adapter).get_logits()).reshape(-1)

    def _generator(self, ids: list[int], options: GenerationOptions, adapter: bool) -> Any:
        """Return a greedy generator that has read ``ids``, with the active adapter (or the base's own) set."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(**options.search_options(len(ids)))
        gen = og.Generator(self.model, params)
        with self._lock:  # one lock for choosing and setting: apply_release may unload the one chosen
            gen.set_active_adapter(self.adapters, self._adapter_name(adapter))  # the base's own: exact correction
        gen.append_tokens(ids)
        return gen


def _onnx_folder(base: Path, manifest: Manifest, cache: Path, options: ExportOptions | None) -> Path:
    """Return the ONNX model folder of the verified base release ``base``: itself, or its export here."""
    if is_onnx_base(manifest.files):
        exported = read_export_info(base).options
        if options is not None and options != exported:
            raise ExportError(f"{base} is an ONNX base exported with {exported}; it cannot be served with {options}")
        return base
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ExportError(
            f"{base} is the 4-bit base, which this device cannot export to ONNX without torch (fleetlora[edge]); "
            "fetch the coordinator's ONNX base instead (fleetlora fetch onnx), or install fleetlora[device]"
        )
    from client.export import export_base

    return export_base(base, cache, options)


def _manifest_digest(folder: Path) -> str | None:
    """Return the digest of the manifest in ``folder`` (unverified: only compared with a verified one), or None.

    Read as :func:`shared.release.read_release` reads it: a regular file (a FIFO would block the open), bounded.
    """
    try:
        return read_manifest(folder / MANIFEST).digest()
    except (OSError, ValueError):
        return None


def _chat_template(folder: Path) -> str | None:
    """Return the model's chat template from the export (None: the tokenizer's own), bounded in size."""
    path = folder / CHAT_TEMPLATE
    try:
        return read_bounded(path, MAX_TEMPLATE_BYTES).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not a chat template ({exc})") from None
