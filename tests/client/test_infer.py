"""On-device inference: a later session never goes back to an older release, a non-finite one is refused, and the
coordinator's signed ONNX base serves a device without torch (verified before it loads)."""

import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from client.infer import EdgeModel
from client.infer_cli import _base_for, newest_base
from client.residency import SMAPS, droppable, mappings
from shared.adapter_files import ADAPTER_WEIGHTS
from shared.cli import main
from shared.errors import ReleaseError
from shared.onnx_base import ExportError, ExportOptions
from shared.sign import public_line
from tests.client.test_export import EXACT, KEY, TRUST, device_model, signed_adapter, trained_state
from tests.conftest import REPO
from tests.fifo import outcome_without_blocking


def _two_rounds(edge_base, tmp_path):
    """Return a run folder with signed rounds 1 and 2 and the options of an `infer` session on them.

    Round 2 does not name round 1 as its previous; the session has its own trust file and replay store.
    """
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    model = device_model(edge_base.base)
    run = tmp_path / "run"
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    signed_adapter(run / "round-0002", model, trained_state(model, 2), edge_base.base, 2, edge_base.digest)
    common = ["--base", str(edge_base.base), "--trust", str(trust), "--cache", str(edge_base.root / "cache")]
    return run, [*common, "--state", str(tmp_path / "accepted.json"), "--max-new-tokens", "2"]


def test_a_later_infer_session_refuses_an_older_round(edge_base, tmp_path, capsys):
    run, common = _two_rounds(edge_base, tmp_path)
    assert main(["infer", *common, "--adapter", str(run / "round-0002"), "Define 'otter'."]) == 0
    capsys.readouterr()
    assert main(["infer", *common, "--adapter", str(run / "round-0001"), "Define 'otter'."]) == 2  # a new session
    assert "replay: round 1 of run run is not newer than the accepted round 2" in capsys.readouterr().err
    assert main(["infer", *common, "--no-adapter", "Define 'otter'."]) == 0  # the base itself stays pinned, usable


def test_a_new_session_whose_latest_release_is_refused_serves_the_last_accepted_round(edge_base, tmp_path, capsys):
    run, common = _two_rounds(edge_base, tmp_path)  # round 2 is off the chain: what a hostile LATEST may name
    session = ["infer", *common, "--adapter", str(run), "Define 'otter'."]
    (run / "LATEST").write_text("round-0001\n")
    assert main(session) == 0  # accepts round 1
    (run / "LATEST").write_text("round-0002\n")
    capsys.readouterr()
    assert main(session) == 0  # was: exit 2, no answer at all
    err = capsys.readouterr().err
    assert "chain broken: round 2 of run run" in err
    assert "round-0001 of this run, the last this device accepted, serves" in err
    assert "[adapter: run run round 1" in err


def test_a_non_finite_adapter_is_refused_and_the_active_one_stays(edge_base, tmp_path):
    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    good, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    edge.apply_release(good)
    ids = edge.prompt_ids("Define 'hammer'.")
    before = edge.logits(ids)
    poisoned = trained_state(model, 2)
    key = sorted(k for k in poisoned if "lora_B" in k)[0]
    poisoned[key][0, 0] = float("nan")
    bad, _ = signed_adapter(tmp_path / "a2", model, poisoned, edge_base.base, 2, edge_base.digest)
    with pytest.raises(ReleaseError, match="non-finite"):
        edge.apply_release(bad)
    assert edge.active is not None and edge.active.manifest == m1
    np.testing.assert_array_equal(edge.logits(ids), before)
    assert torch.isfinite(torch.from_numpy(before)).all()


def test_a_signed_adapter_whose_factors_are_not_of_its_configs_rank_is_refused(edge_base, tmp_path, monkeypatch):
    """Its scale is alpha / r of the config: wider factors would be served, scaled wrongly, and cost their size."""
    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    good, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    edge.apply_release(good)
    wider = trained_state(model, 2)
    module = sorted(k for k in wider if "lora_A" in k)[0].removesuffix(".lora_A.weight")
    a, b = wider[f"{module}.lora_A.weight"], wider[f"{module}.lora_B.weight"]
    wider[f"{module}.lora_A.weight"] = torch.cat([a, a])  # (2r, K): still a LoRA pair, of twice the config's r
    wider[f"{module}.lora_B.weight"] = torch.cat([b, b], dim=1)
    bad, _ = signed_adapter(tmp_path / "a2", model, wider, edge_base.base, 2, edge_base.digest)
    with pytest.raises(ReleaseError, match=r"lora_A of rank \d+ and lora_B of rank \d+; this graph serves r = "):
        edge.apply_release(bad)
    assert edge.active is not None and edge.active.manifest == m1
    monkeypatch.setattr("client.infer._convert", None)  # `infer` asks again before every prompt: no second child
    with pytest.raises(ReleaseError, match=r"this graph serves r = .*\(refused before in this session\)$"):
        edge.apply_release(bad)


def test_the_active_adapter_is_not_verified_again_but_a_new_release_is(edge_base, tmp_path, monkeypatch):
    """``fleetlora infer`` follows LATEST before every prompt: the active release costs no second check."""
    import client.infer

    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    first, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    second, m2 = signed_adapter(tmp_path / "a2", model, trained_state(model, 2), edge_base.base, 2, edge_base.digest)
    edge.apply_release(first)
    checked = []
    verify = client.infer.verify_release
    monkeypatch.setattr(client.infer, "verify_release", lambda release, *a: checked.append(1) or verify(release, *a))
    (first / ADAPTER_WEIGHTS).write_bytes(b"swapped after it was applied")  # what is served was converted then

    assert edge.apply_release(first) == m1 and checked == []
    assert edge.apply_release(second) == m2 and checked == [1]
    with pytest.raises(ReleaseError, match=ADAPTER_WEIGHTS):  # no longer active: verified, its swapped file caught
        edge.apply_release(first)
    assert edge.active is not None and edge.active.manifest == m2
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")  # opening it to compare with the active manifest would wait for a writer
    refused = outcome_without_blocking(lambda: edge.apply_release(fifo), fifo / "manifest.json")
    assert isinstance(refused, ReleaseError), refused


def test_a_conversion_that_crashes_is_a_refusal_and_the_active_adapter_stays(onnx_base, edge_base, tmp_path):
    """The child process that converts an adapter fails (here: the export's corrections vanished after loading)."""
    base = tmp_path / "onnx"
    shutil.copytree(onnx_base, base)
    model = device_model(edge_base.base)
    edge = EdgeModel(base, TRUST, tmp_path / "cache", threads=1)
    good, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    edge.apply_release(good)
    ids = edge.prompt_ids("Define 'hammer'.")
    before = edge.logits(ids)
    (base / "correction.safetensors").unlink()
    newer, _ = signed_adapter(tmp_path / "a2", model, trained_state(model, 2), edge_base.base, 2, edge_base.digest)
    with pytest.raises(ReleaseError, match=r"converting the adapter failed \(exit 1\): .*correction"):
        edge.apply_release(newer)
    assert edge.active is not None and edge.active.manifest == m1
    np.testing.assert_array_equal(edge.logits(ids), before)


@pytest.mark.parametrize(
    ("child", "refusal"),
    [  # what a conversion child that goes wrong does: talks too much, or hangs without reading its input
        (
            "import sys; sys.stderr.write('x' * 20_000_000 + '\\nlast words\\x1b[2K'); sys.exit(1)",
            r"converting the adapter failed \(exit 1\): last words\\x1b\[2K$",
        ),
        ("import time; time.sleep(60)", "converting the adapter took longer than 1 s"),
    ],
)
def test_a_conversion_child_is_bounded_in_what_it_says_and_how_long_it_takes(
    edge_base, tmp_path, monkeypatch, child, refusal
):
    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    release, _ = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    monkeypatch.setattr("client.infer.python_module", lambda *_: [sys.executable, "-c", child])
    monkeypatch.setattr("client.infer.CONVERT_TIMEOUT_S", 1)
    tracemalloc.start()
    try:
        with pytest.raises(ReleaseError, match=refusal):
            edge.apply_release(release)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the 20 MB the child wrote stayed in a file: was all of it, in this process
    assert edge.active is None


def test_an_adapter_onnx_runtime_cannot_load_is_a_refusal_and_the_active_one_stays(edge_base, tmp_path):
    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    good, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    edge.apply_release(good)
    _, m2 = signed_adapter(tmp_path / "a2", model, trained_state(model, 2), edge_base.base, 2, edge_base.digest)
    damaged = tmp_path / "damaged.onnx_adapter"  # what a full disk or a bug in the converter could leave
    damaged.write_bytes(b"\0" * 100)
    with pytest.raises(ReleaseError, match="ONNX Runtime could not load the converted adapter"):
        edge._activate(m2, damaged)  # was a RuntimeError, which `infer` does not treat as a refusal
    assert edge.active is not None and edge.active.manifest == m1
    assert edge.logits(edge.prompt_ids("Define 'hammer'.")).shape[0] > 0  # still answering


def test_the_onnx_base_release_answers_as_the_local_export_and_needs_no_export(onnx_base, edge_base, tmp_path):
    model = device_model(edge_base.base)
    adapter, _ = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    local = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1)  # the session's export
    edge = EdgeModel(onnx_base, TRUST, tmp_path / "empty-cache", threads=1)
    assert edge.folder == onnx_base and not (tmp_path / "empty-cache" / "onnx").exists()  # loaded as verified
    for m in (local, edge):
        m.apply_release(adapter)
    ids = local.prompt_ids("Define 'otter'.")
    assert edge.prompt_ids("Define 'otter'.") == ids
    np.testing.assert_array_equal(edge.logits(ids), local.logits(ids))  # the same graph, codes and adapter inputs


def test_the_prompt_is_in_the_models_chat_template_as_in_training(onnx_base, tokenizer):
    edge = EdgeModel(onnx_base, TRUST, onnx_base.parent, threads=1)
    messages = [{"role": "user", "content": "Define 'otter'. (ünïcode <b>)"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert edge.prompt_ids(messages[0]["content"]) == expected


def test_a_loaded_model_keeps_no_clean_page_of_its_files_mapped_and_still_answers(onnx_base):
    edge = EdgeModel(onnx_base, TRUST, onnx_base.parent, threads=1)
    folder = edge.folder.resolve()
    mapped = [m for m in mappings(SMAPS.read_text()) if m.path.startswith(f"{folder}/")]
    assert mapped  # ONNX Runtime maps the model's data file
    assert [m for m in mapped if droppable(m, folder)] == []  # released after load (client/residency.py)
    assert np.isfinite(edge.logits(edge.prompt_ids("Define 'otter'."))).all()  # read back from the file


@pytest.mark.parametrize("victim", ["model.onnx.data", "genai_config.json", "export.json"])
def test_a_tampered_onnx_base_release_is_refused_before_it_loads(onnx_base, tmp_path, victim):
    copy = tmp_path / "onnx"
    shutil.copytree(onnx_base, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match=f"{victim}: SHA-256"):
        EdgeModel(copy, TRUST, tmp_path / "cache", threads=1)


def test_an_onnx_base_is_not_served_with_options_it_was_not_exported_with(onnx_base, tmp_path):
    with pytest.raises(ExportError, match="exported with"):
        EdgeModel(onnx_base, TRUST, tmp_path / "cache", threads=1, options=ExportOptions(output_bits=4))


def test_edge_inference_imports_neither_torch_nor_transformers(onnx_base, edge_base, tmp_path):
    """``fleetlora infer`` from the ONNX base with an adapter, in a fresh interpreter: no torch module loaded.

    Nor onnxruntime's Python API: the adapter is converted in a child process, so its ~100 MB of
    temporaries never join the serving process (onnxruntime-genai is ``onnxruntime_genai``). Nor
    ``cryptography``: signatures are checked in a child process too (~11 MiB not mapped).
    """
    model = device_model(edge_base.base)
    adapter, _ = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    argv = ["infer", "--base", str(onnx_base), "--adapter", str(adapter), "--trust", str(trust)]
    argv += ["--cache", str(tmp_path / "cache"), "--max-new-tokens", "3", "Define 'otter'."]
    code = (
        "import sys, json; from shared.cli import main; rc = main(json.loads(sys.argv[1])); "
        "heavy = ('torch', 'transformers', 'peft', 'onnx', 'onnxruntime', 'cryptography'); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
        "print('LOADED', loaded); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout[-2000:]


def test_infer_takes_the_onnx_base_of_the_adapters_base_first_in_cache_and_store(onnx_base, edge_base, tmp_path):
    releases, store = tmp_path / "releases", tmp_path / "store"
    for root in (releases, store):
        shutil.copytree(edge_base.base, root / "base")
        shutil.copytree(onnx_base, root / "onnx")
    model = device_model(edge_base.base)
    run = store / "adapter" / "run"
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    (run / "LATEST").write_text("round-0001\n")
    assert newest_base(releases, edge_base.digest) == releases / "onnx"  # loaded as fetched: no export, no torch
    assert _base_for(run, tmp_path / "empty") == store / "onnx"


def test_the_coordinator_publishes_the_onnx_base_an_edge_device_loads_as_fetched(
    edge_base, onnx_base, tmp_path, monkeypatch
):
    """``base.onnx = 1``: the ServerApp exports its 4-bit base and signs it as ``<store>/onnx``, once."""
    import server.server_app as app

    store = tmp_path / "store"
    shutil.copytree(edge_base.base, store / "base")
    monkeypatch.setattr(app, "cache_dir", lambda: edge_base.root / "cache")  # the session's export, cached
    app._publish_onnx(store, KEY)
    first = (store / "onnx" / "manifest.json").read_bytes()
    model = EdgeModel(store / "onnx", TRUST, tmp_path / "device", threads=1)  # verified, then loaded as it is
    assert model.base_digest == edge_base.digest and model.folder == store / "onnx"
    assert not (tmp_path / "device" / "onnx").exists()  # nothing exported on the device
    ids = model.prompt_ids("Define 'otter'.")
    by_hand = EdgeModel(onnx_base, TRUST, tmp_path / "other", threads=1)  # fleetlora export + publish-onnx
    np.testing.assert_array_equal(model.logits(ids), by_hand.logits(ids))
    app._publish_onnx(store, KEY)
    assert (store / "onnx" / "manifest.json").read_bytes() == first  # the same release: devices see nothing new


_HEAP_SLACK = """
import sys
from client.infer_cli import return_freed_heap

def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024

if sys.argv[1] == "set":
    print("set", return_freed_heap(), file=sys.stderr)
before = anon()
big = b"x" * (24 << 20)  # served by mmap; freeing it raises glibc's thresholds unless they are fixed
del big
blocks = [b"y" * (1 << 20) for _ in range(16)]  # written: resident
del blocks
print(anon() - before)  # freed, yet resident
"""


OPERATOR = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}  # keeps freed heap


@pytest.mark.parametrize("env", [{}, OPERATOR], ids=["default", "operator-setting"])
def test_infer_gives_freed_memory_back_unless_the_operator_set_it(env):
    """`fleetlora infer`'s process returns freed heap at once; glibc's own default keeps 16 MB of it here."""

    def kept(mode):
        done = subprocess.run([sys.executable, "-c", _HEAP_SLACK, mode], capture_output=True, text=True,
                              cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, check=True)  # fmt: skip
        return int(done.stdout), done.stderr

    default, _ = kept("plain")
    bounded, said = kept("set")
    assert default >= 12 << 20  # glibc's default keeps the 16 MiB freed last (this operator's, all 24)
    if env:
        assert "set False" in said and bounded >= 12 << 20  # the operator's threshold is theirs
    else:
        assert "set True" in said and bounded <= 2 << 20
