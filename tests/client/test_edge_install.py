"""``pip install fleetlora[edge]`` into a fresh venv: no torch, and it fetches, verifies and answers.

The install resolves ``[edge]`` from the package registry like a user's would (the package itself
built from this tree, its dependencies resolved by pip; downloads cached in
``$FLEETLORA_WHEEL_CACHE``, default ``/tmp/fleetlora-pip-cache``, so a second run downloads
nothing). The venv is made while the session's tiny ONNX base is exported, signed and served on
127.0.0.1; then the venv's own ``fleetlora`` fetches the ONNX base and an adapter, answers a
prompt, and refuses what fails verification. It lives beside the inference tests to share
their one export (CI time).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.distribute import serve
from shared.layout import point_latest
from shared.sign import public_line
from tests.client.test_export import KEY, device_model, signed_adapter, trained_state
from tests.conftest import REPO

pytestmark = pytest.mark.slow
PIP_CACHE = Path(os.environ.get("FLEETLORA_WHEEL_CACHE", "/tmp/fleetlora-pip-cache"))
SOURCES = ("pyproject.toml", "README.md", "client", "server", "shared")


@pytest.fixture(scope="session")
def edge_venv(tmp_path_factory):
    """Start ``pip install <this tree>[edge]`` into a fresh venv; the test waits for it (it runs meanwhile)."""
    root = tmp_path_factory.mktemp("edge-install")
    src, venv = root / "src", root / "venv"
    src.mkdir()
    for name in SOURCES:  # a copy: pip builds in the source tree, and this one must stay clean
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    cmd += ["--disable-pip-version-check", "--cache-dir", str(PIP_CACHE), f"{src}[edge]"]
    log = open(root / "pip.log", "w")
    pip = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    yield pip, venv, root / "pip.log"
    pip.kill()
    log.close()


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(
        [str(venv / "bin" / "fleetlora"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_an_edge_install_has_no_torch_and_fetches_verifies_and_answers(edge_venv, onnx_base, edge_base, tmp_path):
    pip, venv, log = edge_venv
    model = device_model(edge_base.base)
    run = onnx_base.parent / "adapter" / "run"
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    point_latest(run, "round-0001")
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    assert pip.wait(timeout=600) == 0, log.read_text()[-3000:]
    python = str(venv / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'peft') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "[]"

    server, port = serve(onnx_base.parent, "127.0.0.1:0")
    try:
        cache, state = tmp_path / "device", tmp_path / "device" / "accepted.json"
        common = ["--address", f"127.0.0.1:{port}", "--trust", str(trust), "--cache", str(cache / "releases")]
        common += ["--state", str(state)]
        for artifact in ("onnx", "adapter/run/latest"):
            done = _run(venv, "fetch", artifact, *common, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
    finally:
        server.stop(None)
    infer = ["infer", "--adapter", str(cache / "releases" / "adapter" / "run"), "--trust", str(trust)]
    infer += ["--cache", str(cache), "--state", str(state), "--max-new-tokens", "4", "Define 'otter'."]
    done = _run(venv, *infer, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr  # the ONNX base picked from the cache
    assert not (cache / "onnx").exists()  # nothing exported: the signed ONNX base is served as fetched

    fetched = (cache / "releases" / "adapter" / "run" / "round-0001").resolve()
    weights = fetched / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # tampered in the cache after the fetch: verified again before it is loaded
    weights.write_bytes(bytes(data))
    done = _run(venv, *infer, cwd=tmp_path)
    assert done.returncode == 2 and "adapter_model.safetensors: SHA-256" in done.stderr, done.stderr

    int4 = _run(venv, "infer", "--base", str(edge_base.base), "--trust", str(trust), "--cache", str(cache),
                "--state", str(tmp_path / "other.json"), "--no-adapter", "hi", cwd=tmp_path)  # fmt: skip
    assert int4.returncode == 2 and "fleetlora fetch onnx" in int4.stderr, int4.stderr  # no torch to export with
