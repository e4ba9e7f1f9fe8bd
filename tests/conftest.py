"""Shared fixtures: the real tokenizer, a tiny llama built from a config, seeded RNG."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model import embedded_model_dir, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "simulations" / "data" / "wordnet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The embedded SmolLM2 folder (``make test`` fetches it before running pytest)."""
    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(real_model_dir: Path):
    return load_tokenizer(str(real_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, real_model_dir: Path) -> Path:
    """A 2-layer llama with SmolLM2's real tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (real_model_dir / name).is_file():
            shutil.copy(real_model_dir / name, folder / name)
    return folder


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file or folder fsynced from now on, in order (each is still fsynced)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point fleetlora's cache at an empty folder."""
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    assert not embedded_model_dir().exists()
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def untrusted_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """One real recorded run (``tests/test_outgoing_messages.py``) whose devices trust another key than the signer's.

    Every device refuses every release. One scenario, one run: ``test_simulation`` checks its round log
    (every device refused, none trained), ``test_outgoing_messages`` what each refusal sent.
    Returns ``run_recorded``'s (round log, recorded replies, config).
    """
    from shared.sign import generate_key
    from tests.test_outgoing_messages import run_recorded

    folder = tmp_path_factory.mktemp("untrusted")
    generate_key(folder / "other.key")
    overrides = {"signing.trust-file": str(folder / "other.key.pub"), "train.steps": 1}
    with pytest.MonkeyPatch.context() as mp:
        return run_recorded(folder, tiny_model_dir, mp, overrides)
