"""The committed gRPC stubs are exactly what proto/generate.py makes from proto/*.proto."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert {p.name for p in fresh} == {"artifact_pb2.py", "artifact_pb2.pyi", "artifact_pb2_grpc.py"}
    for path in fresh:
        committed = ROOT / "shared" / "proto" / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `python proto/generate.py`"
