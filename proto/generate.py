"""Generate the Python stubs of ``proto/*.proto`` into ``shared/proto/`` (``python proto/generate.py``).

The stubs are committed; ``tests/shared/test_proto.py`` regenerates them into a temporary
folder and fails if the committed ones differ. Never edit them by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ("artifact.proto",)


def generate(out: Path) -> list[Path]:
    """Write ``shared/proto/<name>_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` under ``out``; return them."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    for name in PROTOS:
        code = protoc.main(
            [
                "protoc",
                f"-I{include}",
                f"-Ishared/proto={ROOT / 'proto'}",  # imports come out as `from shared.proto import ...`
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                f"shared/proto/{name}",
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {name} (exit {code})")
    return sorted((out / "shared" / "proto").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    sys.exit(0)
