"""Fixtures the device-side test modules share."""

from types import SimpleNamespace

import pytest

from client.export import export_base
from server.onnx_release import publish_onnx_base
from server.quantize import publish_base, quantize_model
from tests.client.test_export import KEY


@pytest.fixture(scope="session")
def edge_base(tiny_model_dir, tmp_path_factory):
    """A signed 4-bit tiny base (as the server publishes it) and its exact (float32-activation) export.

    One per session: the export takes most of a minute, and the export, inference and generation
    tests only read it (each test's adapters and replay state live in its own folders).
    """
    root = tmp_path_factory.mktemp("edge")
    _, manifest = publish_base(tiny_model_dir, "s" * 64, root / "store", KEY)
    base = root / "store" / "base"
    return SimpleNamespace(
        root=root, base=base, digest=manifest.base_digest, export=export_base(base, root / "cache", 0)
    )


@pytest.fixture(scope="session")
def onnx_base(edge_base):
    """The session's export signed as the coordinator's ONNX base release (``<store>/onnx``): what an edge fetches."""
    publish_onnx_base(edge_base.export, edge_base.root / "store", KEY)
    return edge_base.root / "store" / "onnx"


@pytest.fixture(scope="session")
def tiny_int4_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as a 4-bit base folder (``server/quantize.py``) with its tokenizer and chat template.

    Tests load it and never write into it.
    """
    folder = tmp_path_factory.mktemp("int4-tiny")
    quantize_model(tiny_model_dir, folder, "s" * 64)
    for f in tiny_model_dir.iterdir():  # tokenizer and chat template
        if f.suffix in (".json", ".jinja") and not (folder / f.name).exists():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder
