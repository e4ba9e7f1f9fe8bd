"""Generation defaults of the edge runtime: repetition control, the model's own settings, the CLI's choice of base."""

import json
import os
import shutil
import time
from dataclasses import replace

import pytest

from client.generation import GenerationOptions, model_defaults
from client.infer import EdgeModel
from client.infer_cli import _base_for, newest_base
from shared.layout import point_latest
from shared.manifest import read_manifest
from shared.release import MANIFEST, SIGNATURE, make_release, write_release
from shared.sign import TrustList
from tests.client.test_export import EXACT, KEY, TRUST, device_model, signed_adapter, trained_state
from tests.fifo import outcome_without_blocking


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def test_the_default_answer_repeats_no_4_gram_where_plain_greedy_loops(edge_base):
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    ids = edge.prompt_ids("Define 'otter'.")
    plain = [t for _, t in edge.generate_tokens(ids, 40)]  # the tiny random model loops at once
    assert len(set(_ngrams(plain, 4))) < len(_ngrams(plain, 4))
    controlled = [t for _, t in edge.generate_tokens(ids, 40, options=edge.generation)]
    grams = _ngrams(ids + controlled, 4)  # the ban spans prompt and answer, as in onnxruntime-genai
    assert len(set(grams)) == len(grams)
    assert edge.generation == GenerationOptions()  # the tiny model's generation_config sets neither


def test_the_models_own_generation_config_sets_the_defaults_and_bad_values_are_ignored(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3, "no_repeat_ngram_size": 0}))
    assert model_defaults(tmp_path) == GenerationOptions(repetition_penalty=1.3, no_repeat_ngram_size=0)
    for bad in ({"repetition_penalty": 0.2}, {"repetition_penalty": "high"}, {"no_repeat_ngram_size": True}, [1]):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        assert model_defaults(tmp_path) == GenerationOptions()
    (tmp_path / "generation_config.json").write_text("{" * 70_000)  # oversized: not even parsed
    assert model_defaults(tmp_path) == GenerationOptions()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"repetition_penalty": 0.9}, "repetition-penalty 0.9 must be in"),
        ({"repetition_penalty": float("nan")}, "repetition-penalty nan"),
        ({"no_repeat_ngram_size": -1}, "no-repeat-ngram -1"),
        ({"max_new_tokens": 0}, "max-new-tokens 0"),
    ],
)
def test_out_of_range_generation_options_are_refused_with_their_flag(values, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**values)


def test_infer_takes_the_base_the_adapter_names_not_the_newest_in_the_cache(edge_base, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(edge_base.base, releases / "base-ours")
    time.sleep(1.1)  # manifests' creation times have one-second resolution
    other, _ = make_release({"config.json": b"{}"}, kind="base", run_id="base", round=0, base_digest="d" * 64,
                            method="fleetlora-int4-b32-asym", key=KEY)  # fmt: skip
    write_release(other, releases / "base-other")  # e.g. a test's base, fetched after the demo's
    model = device_model(edge_base.base)
    adapter, _ = signed_adapter(tmp_path / "run" / "round-0001", model, trained_state(model, 1), edge_base.base, 1,
                                edge_base.digest)  # fmt: skip
    assert newest_base(releases) == releases / "base-other"  # what infer took before
    assert _base_for(adapter, releases) == releases / "base-ours"
    with pytest.raises(ValueError, match="no base release of base model"):
        _base_for(adapter, tmp_path / "empty")


def test_a_cache_entry_whose_manifest_is_not_a_file_is_skipped_not_a_crash_or_a_hang(edge_base, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(edge_base.base, releases / "base-ours")
    (releases / "junk-folder" / MANIFEST).mkdir(parents=True)  # read_bytes raised IsADirectoryError here
    (releases / "junk-fifo").mkdir()
    os.mkfifo(releases / "junk-fifo" / MANIFEST)  # a plain open waits for a writer forever
    found = outcome_without_blocking(lambda: newest_base(releases), releases / "junk-fifo" / MANIFEST)
    assert found == releases / "base-ours"


def test_an_unsigned_newer_base_manifest_does_not_shadow_the_signed_base(edge_base, tmp_path, capsys):
    releases = tmp_path / "releases"
    shutil.copytree(edge_base.base, releases / "base-ours")
    good = read_manifest(releases / "base-ours" / MANIFEST)
    forged = replace(good, created="2999-01-01T00:00:00Z")  # newer than any: ranked first
    (releases / "zz").mkdir()
    (releases / "zz" / MANIFEST).write_bytes(forged.canonical())  # no signature (or a copied, non-matching one)
    (releases / "zz" / SIGNATURE).write_bytes((releases / "base-ours" / SIGNATURE).read_bytes())
    assert newest_base(releases) == releases / "zz"  # ranked by the unverified manifests alone
    assert newest_base(releases, trust=TRUST) == releases / "base-ours"
    assert "[base" in capsys.readouterr().err  # the skipped one is named
    with pytest.raises(ValueError, match="2 whose signature does not verify skipped"):
        newest_base(releases, trust=TrustList.of())  # a device that trusts neither signer


def test_an_unfinished_download_of_a_newer_base_is_not_chosen(edge_base, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(edge_base.base, releases / "base-ours")
    newer, manifest = make_release({"config.json": b"{}"}, kind="base", run_id="base", round=0, base_digest="d" * 64,
                                   method="fleetlora-int4-b32-asym", key=KEY)  # fmt: skip
    partial = releases / f"{manifest.digest()}.partial"  # a fetch cut short: signed manifest, files missing
    partial.mkdir()
    (partial / MANIFEST).write_bytes(newer.manifest_bytes)
    (partial / SIGNATURE).write_bytes(newer.signature)
    assert newest_base(releases, trust=TRUST) == releases / "base-ours"


def test_a_forged_base_beside_the_adapter_run_is_not_taken(edge_base, tmp_path):
    store = tmp_path / "store"
    model = device_model(edge_base.base)
    run = store / "adapter" / "run"  # as the README's `infer --adapter <store>/adapter/<run-id>` names it
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    point_latest(run, "round-0001")
    forged = replace(read_manifest(edge_base.base / MANIFEST), created="2999-01-01T00:00:00Z")
    (store / "onnx").mkdir()
    (store / "onnx" / MANIFEST).write_bytes(forged.canonical())  # unsigned
    releases = tmp_path / "releases"
    shutil.copytree(edge_base.base, releases / "base-ours")
    assert _base_for(run, releases) == store / "onnx"  # chosen by the unverified manifest alone
    assert _base_for(run, releases, TRUST) == releases / "base-ours"
