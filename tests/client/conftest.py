"""Fixtures the device-side test modules share."""

from types import SimpleNamespace

import pytest

from client.export import export_base
from server.onnx_release import publish_onnx_base
from server.quantize import publish_base
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
