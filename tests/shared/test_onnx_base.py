"""export.json, the ONNX base's own description, is parsed strictly: a bad field is refused by name."""

import json
import os

import pytest

from shared.onnx_base import DONE, EXPORT_VERSION, ExportError, ExportOptions, is_onnx_base, read_export_info
from tests.fifo import outcome_without_blocking

LAYER = {"in": 64, "modules": ["model.layers.0.self_attn.q_proj"], "out": [64]}
GOOD = {
    "base_digest": "d" * 64,
    "export_version": EXPORT_VERSION,
    "options": {"accuracy_level": 4, "output_bits": 8},
    "lora_layers": {"model.layers.0.attn.qkv_proj": LAYER},
}


def _write(tmp_path, info):
    (tmp_path / DONE).write_text(json.dumps(info))
    return tmp_path


def test_a_good_export_json_is_parsed_into_its_typed_view(tmp_path):
    info = read_export_info(_write(tmp_path, GOOD))
    assert info.base_digest == "d" * 64 and info.options == ExportOptions()
    assert info.layers_json() == GOOD["lora_layers"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"base_digest": "short"}, "base_digest"),
        ({"export_version": EXPORT_VERSION - 1}, "export version"),
        ({"options": {"accuracy_level": 4}}, "options must name"),
        ({"options": {"accuracy_level": 9, "output_bits": 8}}, "accuracy_level 9"),
        ({"options": {"accuracy_level": True, "output_bits": 8}}, "options must be integers"),
        ({"lora_layers": {}}, "lora_layers"),
        ({"lora_layers": {"l": {**LAYER, "in": 65}}}, "input width 65"),
        ({"lora_layers": {"l": {**LAYER, "out": [64, 64]}}}, "one output width each"),
        ({"lora_layers": {"l": {**LAYER, "out": [-1]}}}, "output width"),
        ({"lora_layers": {"l": {**LAYER, "extra": 1}}}, "exactly in, modules and out"),
        ({"lora_layers": {"l": {**LAYER, "modules": [7]}}}, "module name"),
    ],
)
def test_a_malformed_export_json_is_refused_naming_the_field(tmp_path, change, reason):
    with pytest.raises(ExportError, match=reason):
        read_export_info(_write(tmp_path, {**GOOD, **change}))


def test_export_json_that_is_not_json_or_too_large_is_refused(tmp_path):
    (tmp_path / DONE).write_text("[1, 2")
    with pytest.raises(ExportError, match="cannot be read as JSON"):
        read_export_info(tmp_path)
    (tmp_path / DONE).write_text(" " * (2 << 20))
    with pytest.raises(ExportError, match="larger than"):
        read_export_info(tmp_path)


def test_export_json_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / DONE)  # infer reads export.json of the cached ONNX base before every load
    refused = outcome_without_blocking(lambda: read_export_info(tmp_path), tmp_path / DONE)
    assert isinstance(refused, ExportError) and "not a regular file" in str(refused)


def test_an_onnx_base_is_told_from_the_4bit_base_by_its_files():
    onnx = {"export.json", "model.onnx", "model.onnx.data", "genai_config.json", "correction.safetensors"}
    assert is_onnx_base(onnx | {"base.onnx_adapter"})
    assert not is_onnx_base(onnx)  # without the base's own adapter it cannot serve exactly
    assert not is_onnx_base({"model.int4.safetensors", "quantization.json", "config.json"})
