"""Only deltas leave a device (issue 16): every reply a device sends in a real ``flwr run``, recorded and checked.

The run is the demo's (``simulations.demo.run_demo``: a SuperLink we own, the tiny llama, the
artifact service) on a generated copy of this project whose ``clientapp`` is
``tests/recording_app.py``: the product's own train/evaluate functions behind a client mod that
writes each reply to disk. Every recorded reply must hold exactly what the coordinator's parser
allows (``server/replies.py``) and nothing about the device's data:

* records: ``arrays`` (ArrayRecord, train only), ``metrics`` (MetricRecord), ``client`` (ConfigRecord);
* ``arrays``: exactly the adapter's uploaded keys for the method (``shared.adapter.uploaded_keys``)
  in the encoding's dtypes and shapes (``shared/wire.py``), read from the run's released adapter;
* ``metrics``: keys of the allow-list of the phase, each an int or float scalar;
* ``client``: ``{"name": <the device's name>}`` only;
* no string anywhere that holds a path, a list of token ids, or a text line of the device's files.

The same rules hold for a refusal of the release (``client`` then also holds ``refused-release``,
its reason), and, with client-side DP, every delta decodes to an L2 norm within ``dp.clip-norm``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

import simulations.flower_local
from client import client_app
from client.partition import Partition, partition_for
from server.replies import EVAL_METRICS, REFUSAL_METRICS, TRAIN_METRICS
from shared.adapter import ADAPTER_WEIGHTS, uploaded_keys
from shared.config import FleetConfig
from shared.wire import BLOCK, SCALE_SUFFIX, unpack
from simulations.demo import app_defaults, run_demo
from tests import recording_app
from tests.conftest import DATA, REPO
from tests.recording_app import RECORD_ENV, SentMessage, read_recordings

TOPICS = ("noun.animal", "noun.food")
PACKAGES = ("client", "server", "shared")  # what the Flower app runs; copied so the FAB carries this tree's code
TOKEN_IDS = re.compile(r"\d+(?:\s*[,;\s]\s*\d+){3,}")  # four or more integers in a row: a tokenized text
REPLY_RECORDS = {
    "train": {"arrays": "ArrayRecord", "metrics": "MetricRecord", "client": "ConfigRecord"},
    "evaluate": {"metrics": "MetricRecord", "client": "ConfigRecord"},
    "refusal": {"metrics": "MetricRecord", "client": "ConfigRecord"},  # a refused release, in either phase
}
ALLOWED_METRICS = {"train": TRAIN_METRICS, "evaluate": EVAL_METRICS}
# The device bounds the norm of the delta as decoded (client/privacy.py: it decodes its own encoding and shrinks
# until within C), so the only slack is the order of summation: the device sums per-tensor norms in float64,
# this test one flat float64 vector of the same float32 values (a relative difference of ~1e-15).
NORM_TOLERANCE = 1e-9


def recording_project(dest: Path) -> Path:
    """Write a Flower project at ``dest``: this tree's packages, the recording ClientApp, pyproject pointing at it."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "tests").mkdir()
    for name in ("__init__.py", "recording_app.py"):
        shutil.copy(REPO / "tests" / name, dest / "tests" / name)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pyproject["project"].pop("readme", None)  # not copied
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "tests.recording_app:app"
    pyproject["tool"]["flwr"]["app"]["fab-include"].append("tests/**")
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


def run_recorded(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]
) -> tuple[dict[str, Any], list[SentMessage], FleetConfig]:
    """Run the demo on the recording project (2 devices, 1 round); return its round log, the replies and config.

    ``monkeypatch`` sets what the run needs (device cache, recording folder, project root); a session-scoped
    caller passes a ``pytest.MonkeyPatch.context()`` that it undoes once the run is over.
    """
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "device-cache"))
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "sent"))
    # run_app and local_superlink run `flwr run` on simulations.flower_local.ROOT: here, the generated project
    monkeypatch.setattr(simulations.flower_local, "ROOT", recording_project(tmp_path / "project"))
    run_config = {
        "signing.key": str(tmp_path / "keys" / "server.key"),
        "signing.trust-file": str(tmp_path / "keys" / "server.key.pub"),
        "model": str(tiny_model_dir),
        "topics": ",".join(TOPICS),
        "min-clients": len(TOPICS),
        "num-server-rounds": 1,
        "train.steps": 2,
        "eval.max-examples": 4,
        "run-name": "outgoing",
        **overrides,
    }
    data = run_demo(run_config, output_dir=tmp_path / "out", flwr_home=tmp_path / "flwr")
    cfg = FleetConfig.from_run_config({**app_defaults(), **run_config, "data-dir": str(DATA)})
    return data, read_recordings(tmp_path / "sent"), cfg


def uploaded_shapes(data: dict[str, Any], method: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a device uploads under ``method``, from the adapter the run released."""
    adapter = load_file(Path(data["run"]["adapter"]) / ADAPTER_WEIGHTS)
    return {k: tuple(adapter[k].shape) for k in uploaded_keys(method, adapter)}


def wire_layout(shapes: dict[str, tuple[int, ...]], encoding: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Array key -> (dtype, shape) that an honest delta of ``shapes`` has on the wire in ``encoding``."""
    if encoding == "fp16":
        return {k: ("float16", s) for k, s in shapes.items()}
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        blocks = -(-math.prod(shape) // BLOCK)
        layout[key] = ("int8", (blocks, BLOCK)) if encoding == "q8" else ("uint8", (blocks, BLOCK // 2))
        layout[key + SCALE_SUFFIX] = ("float16", (blocks,))
    return layout


def private_texts(part: Partition) -> list[str]:
    """Every line of the device's training and held-out files, and every text field in them."""
    texts = []
    for path in (part.train_file, part.heldout_file):
        for line in path.read_text().splitlines():
            texts.append(line)
            example = json.loads(line)
            texts += [m["content"] for m in example.get("messages", [])]
            texts += [str(example[k]) for k in ("instruction", "response", "text") if k in example]
    return [t for t in texts if t.strip()]


def strings_in(values: dict[str, Any]) -> list[str]:
    """Every string a recorded record's values hold, inside lists too."""
    out = []
    stack = list(values.values())
    while stack:
        v = stack.pop()
        if v["type"] == "list":
            stack += v["value"]
        elif v["type"] in ("str", "bytes"):
            out.append(v["value"])
    return out


def leak_in(s: str, texts: list[str]) -> str | None:
    """Why ``s`` may not leave a device (a path, token ids, a line or text of its data), or None."""
    if "/" in s or "\\" in s or s.startswith("~") or Path(s).exists():
        return "a path"
    if TOKEN_IDS.search(s):
        return "a list of token ids"
    hit = next((t for t in texts if t in s), None)
    return None if hit is None else f"the device's text {hit[:40]!r}"


def check_reply(sent: SentMessage, layout: dict[str, tuple[str, tuple[int, ...]]], part: Partition) -> None:
    """Assert one reply holds only what may leave a device (see the module docstring)."""
    kind = sent.received["message_type"]
    where = f"node {sent.node_id} ({part.name}), round {sent.received['server_round']}, {kind} reply"
    assert sent.error is None, f"{where}: the device replied with an error {sent.error}"
    client = sent.records.get("client", {}).get("values", {})
    refused = "refused-release" in client
    records = REPLY_RECORDS["refusal" if refused else kind]
    assert {n: r["type"] for n, r in sent.records.items()} == records, f"{where}: records {sent.records.keys()}"
    if "arrays" in records:
        arrays = sent.records["arrays"]["arrays"]
        assert {k: (a["dtype"], tuple(a["shape"])) for k, a in arrays.items()} == layout, f"{where}: arrays"
        assert all(a["stype"] == "numpy.ndarray" for a in arrays.values()), where
        got = {k.removeprefix("arrays/"): (str(t.dtype), t.shape) for k, t in sent.tensors.items()}
        assert got == layout, f"{where}: the arrays' bytes hold other dtypes or shapes than declared"
    else:
        assert not sent.tensors, f"{where}: arrays without an ArrayRecord"
    metrics = sent.records["metrics"]["values"]
    allowed = REFUSAL_METRICS if refused else ALLOWED_METRICS[kind]
    assert set(metrics) <= set(allowed), f"{where}: metrics {sorted(set(metrics) - set(allowed))} are not allowed"
    assert {k for k, (_, _, _, required) in allowed.items() if required} <= set(metrics), f"{where}: metrics lack"
    assert all(v["type"] in ("int", "float") for v in metrics.values()), f"{where}: non-scalar metrics {metrics}"
    assert client.get("name") == {"type": "str", "value": part.name}, f"{where}: name {client.get('name')}"
    assert set(client) == ({"name", "refused-release"} if refused else {"name"}), f"{where}: client {set(client)}"
    assert all(v["type"] == "str" for v in client.values()), f"{where}: client values {client}"
    texts = private_texts(part)
    for s in strings_in(client) + strings_in(metrics):
        assert leak_in(s, texts) is None, f"{where}: {s[:80]!r} holds {leak_in(s, texts)}"


def check_all_replies(data: dict[str, Any], sent: list[SentMessage], cfg: FleetConfig, refused: bool = False) -> None:
    """Assert every reply the coordinator logged was recorded, and that each holds only a delta and metrics.

    ``refused``: every device refused every release (then no reply may carry arrays), else none did.
    """
    rounds = {r["round"]: r for r in data["rounds"]}
    nodes = {c["node_id"] for c in rounds[1]["clients"].values()}
    assert len(nodes) == len(TOPICS)
    expected = {(n, 0, "evaluate") for n in nodes} | {(n, 1, k) for n in nodes for k in ("train", "evaluate")}
    got = [(s.node_id, s.received["server_round"], s.received["message_type"]) for s in sent]
    assert sorted(got) == sorted(expected), "the recording missed a reply, or a device sent more than expected"
    assert all(("refused-release" in s.records.get("client", {}).get("values", {})) == refused for s in sent)
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    if not refused:
        layout = wire_layout(uploaded_shapes(data, cfg.aggregation.method), cfg.aggregation.delta_encoding)
        assert layout
    for s in sent:
        check_reply(s, layout, partition_for(s.received["node_config"], cfg))


@pytest.mark.slow
def test_only_the_adapter_delta_and_allowed_metrics_leave_a_device(tmp_path, tiny_model_dir, monkeypatch):
    # FFA-LoRA (B only) in 4-bit codes: the strictest layout (B keys, uint8 codes + fp16 scales)
    overrides = {"aggregation.method": "ffa", "aggregation.delta-encoding": "q4"}
    data, sent, cfg = run_recorded(tmp_path, tiny_model_dir, monkeypatch, overrides)
    check_all_replies(data, sent, cfg)
    uploaded = {k for s in sent for k in s.records.get("arrays", {}).get("arrays", {})}
    assert uploaded and all(".lora_B.weight" in k for k in uploaded)  # A never leaves a device under FFA-LoRA


@pytest.mark.slow
def test_a_device_that_refuses_the_release_sends_its_name_and_a_reason_only(untrusted_run):
    # the refusal's reason is the one free text a device sends: it may say why, never where (paths) or what (data).
    # untrusted_run (tests/conftest.py): run_recorded with devices that trust another key than the signing one
    data, sent, cfg = untrusted_run
    check_all_replies(data, sent, cfg, refused=True)


@pytest.mark.slow
def test_with_client_side_dp_every_delta_that_leaves_a_device_is_clipped(tmp_path, tiny_model_dir, monkeypatch):
    # below the tiny model's 2-step deltas (norm ~0.16): every device clips; large enough that the clipped
    # entries (~C / sqrt(16k)) stay normal fp16 numbers. Not q8/q4 for now: shared/wire.py's _quantize divides by
    # max(scale, fp16's smallest normal), which shrinks every block whose largest entry is below 127 (q4: 7) times
    # 6.1e-5, so a delta clipped this far decodes to a fraction of its norm (to 0 at C = 1e-3).
    clip_norm = 0.02
    overrides = {
        "aggregation.method": "fedavg",
        "aggregation.delta-encoding": "fp16",
        "dp.clipping": "client",
        "dp.noise-multiplier": 1.0,
        "dp.clip-norm": clip_norm,
    }
    data, sent, cfg = run_recorded(tmp_path, tiny_model_dir, monkeypatch, overrides)
    check_all_replies(data, sent, cfg)
    shapes = uploaded_shapes(data, "fedavg")
    trained = [s for s in sent if s.received["message_type"] == "train"]
    assert len(trained) == len(TOPICS)
    for s in trained:
        record = ArrayRecord({k.removeprefix("arrays/"): Array(np.ascontiguousarray(t)) for k, t in s.tensors.items()})
        delta = unpack(record, shapes, "fp16")  # what the coordinator decodes
        norm = torch.linalg.vector_norm(torch.cat([t.flatten().double() for t in delta.values()])).item()
        assert norm <= clip_norm * (1 + NORM_TOLERANCE), f"node {s.node_id} sent a delta of norm {norm}"
        assert norm > 0.9 * clip_norm  # clipped to the bound, not merely small: the bound was tested
        assert s.records["metrics"]["values"]["dp-clipped"] == {"type": "int", "value": 1}
    privacy = {r["round"]: r for r in data["rounds"]}[1]["privacy"]
    assert privacy["clipping"] == "client" and privacy["clip_norm"] == clip_norm
    assert privacy["noise_multiplier"] == 1.0 and privacy["clipped_fraction"] == 1.0


def test_the_recording_app_registers_what_the_product_app_registers():
    # the wrapper must run the device's own functions, no more and no fewer (Flower keeps them by message type)
    assert set(recording_app.app._registered_funcs) == set(client_app.app._registered_funcs)
    assert recording_app.app._mods[1:-1] == client_app.app._mods  # and behind the product's own mods


# The checker's teeth, without Flower: each kind of leak in an otherwise honest reply is caught.
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
LAYOUT = wire_layout({KEY: (64, 8)}, "q4")


def _honest_train_reply() -> SentMessage:
    arrays = {k: {"dtype": d, "shape": list(s), "stype": "numpy.ndarray", "nbytes": 0} for k, (d, s) in LAYOUT.items()}
    metrics = {"num-examples": 500, "train-loss": 2.5, "train-seconds": 1.0}
    records = {
        "arrays": {"type": "ArrayRecord", "arrays": arrays},
        "metrics": {
            "type": "MetricRecord",
            "values": {k: {"type": type(v).__name__, "value": v} for k, v in metrics.items()},
        },
        "client": {"type": "ConfigRecord", "values": {"name": {"type": "str", "value": "noun.animal"}}},
    }
    tensors = {f"arrays/{k}": np.zeros(s, dtype=d) for k, (d, s) in LAYOUT.items()}
    received = {"message_type": "train", "server_round": 1, "node_config": {"partition-id": 0}}
    return SentMessage(7, received, None, records, tensors)


@pytest.fixture
def animal() -> Partition:
    cfg = FleetConfig.from_run_config({**app_defaults(), "data-dir": str(DATA), "topics": ",".join(TOPICS)})
    return partition_for({"partition-id": 0}, cfg)


def _first_line(part: Partition) -> str:
    return part.train_file.read_text().splitlines()[0]


def _answer(part: Partition) -> str:
    return json.loads(_first_line(part))["messages"][1]["content"]


def _add_metric(reply: SentMessage, key: str, value: dict[str, Any]) -> None:
    reply.records["metrics"]["values"][key] = value


LEAKS = {
    "a metric outside the allow-list": lambda r, p: _add_metric(r, "lr", {"type": "float", "value": 1e-3}),
    "a list metric": lambda r, p: _add_metric(r, "train-loss", {"type": "list", "value": []}),
    "a text metric": lambda r, p: _add_metric(r, "train-loss", {"type": "str", "value": "2.5"}),
    "a second client key": lambda r, p: r.records["client"]["values"].update(topic={"type": "str", "value": "x"}),
    "another name": lambda r, p: r.records["client"]["values"].update(name={"type": "str", "value": "noun.food"}),
    "an extra record": lambda r, p: r.records.update(debug={"type": "ConfigRecord", "values": {}}),
    "the A factor too": lambda r, p: r.records["arrays"]["arrays"].update(
        {KEY.replace("lora_B", "lora_A"): {"dtype": "uint8", "shape": [8, 32], "stype": "numpy.ndarray"}}
    ),
    "bytes other than declared": lambda r, p: r.tensors.update({f"arrays/{KEY}": np.zeros((8, 32), np.float32)}),
    "a refusal reason with a path": lambda r, p: _refusal(r, f"cannot read {p.train_file}"),
    "a refusal reason with a line of data": lambda r, p: _refusal(r, f"bad example {_first_line(p)}"),
    "a refusal reason with an answer": lambda r, p: _refusal(r, f"expected {_answer(p)}"),
    "a refusal reason with token ids": lambda r, p: _refusal(r, "ids 1, 4093, 28, 17 too long"),
    "a refusal reason as bytes": lambda r, p: _refusal(r, b"why".hex(), "bytes"),
}


def _refusal(reply: SentMessage, reason: str, kind: str = "str") -> None:
    reply.records.pop("arrays")
    reply.tensors.clear()
    reply.records["metrics"]["values"] = {"refused-release": {"type": "int", "value": 1}}
    reply.records["client"]["values"]["refused-release"] = {"type": kind, "value": reason}


def test_the_checker_passes_an_honest_reply_and_a_plain_refusal(animal):
    check_reply(_honest_train_reply(), LAYOUT, animal)
    refusal = _honest_train_reply()
    _refusal(refusal, "signed by key 3f2a9c, which is not in the trust list")
    check_reply(refusal, LAYOUT, animal)


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_the_checker_catches(leak, animal):
    reply = _honest_train_reply()
    LEAKS[leak](reply, animal)
    with pytest.raises(AssertionError):
        check_reply(reply, LAYOUT, animal)
