"""Record-level DP-SGD on a device (Opacus on the frozen 4-bit base + LoRA): clipping, ledger, budget."""

import json

import pytest
import torch

from client.record_dp import Ledger, RecordBudgetError, RecordDp, per_example_nll, train_record_dp
from client.train import response_nll
from shared.adapter import adapter_state, attach_lora
from shared.clipping import update_norm
from shared.config import LoraConfig, TrainConfig
from shared.data import collate, encode, load_jsonl
from shared.model import load_model, load_tokenizer
from tests.client.test_client_app import DATA


@pytest.fixture(scope="module")
def int4_tiny(tiny_int4_dir):
    tok = load_tokenizer(str(tiny_int4_dir))
    return tiny_int4_dir, tok, [encode(e, tok, 48) for e in load_jsonl(DATA / "train.jsonl")[:24]]


def _model(folder):
    return attach_lora(load_model(str(folder), torch.float32), LoraConfig(rank=4), seed=0)


def test_per_example_losses_are_each_examples_mean_token_loss(int4_tiny):
    folder, tok, data = int4_tiny
    model = _model(folder)
    with torch.no_grad():
        losses = per_example_nll(model, collate(data[:3], tok.pad_token_id))
        for i in range(3):
            nll, count = response_nll(model, collate(data[i : i + 1], tok.pad_token_id))
            assert float(losses[i]) == pytest.approx(float(nll) / count, rel=1e-4)


@pytest.mark.parametrize(("clip_norm", "bounded"), [(0.01, True), (1e6, False)])
def test_each_examples_gradient_is_clipped_before_it_moves_the_adapter(int4_tiny, tmp_path, clip_norm, bounded):
    # plain SGD with lr 0.5 and no noise: the step is minus 0.5 x the sum of the sampled clipped gradients
    folder, tok, data = int4_tiny
    model = _model(folder)
    for key, p in model.named_parameters():
        if "lora_B" in key:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would give A no gradient at all
    before = adapter_state(model)
    cfg = TrainConfig(steps=1, batch_size=len(data), lr=0.5)  # q = 1: every example in the one step
    dp = RecordDp(noise_multiplier=1e-9, clip_norm=clip_norm, delta=1e-5, max_epsilon=None)
    train_record_dp(model, data, cfg, tok.pad_token_id, dp, Ledger(tmp_path / "l.json"), torch.optim.SGD)
    step = update_norm({k: v - before[k] for k, v in adapter_state(model).items()})
    assert step > 0
    bound = 0.5 * len(data) * 0.01 * (1 + 1e-4)  # what 24 examples clipped to 0.01 can move it, at most
    assert (step <= bound) == bounded  # unclipped (C = 1e6), the same step moves it much more


def test_the_ledger_persists_what_the_device_spent_and_refuses_to_overspend(int4_tiny, tmp_path):
    folder, tok, data = int4_tiny
    model, ledger_file = _model(folder), tmp_path / "state" / "ledger.json"
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3)
    dp = RecordDp(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, max_epsilon=None)
    _, first, _ = train_record_dp(model, data, cfg, tok.pad_token_id, dp, Ledger(ledger_file))
    _, second, _ = train_record_dp(model, data, cfg, tok.pad_token_id, dp, Ledger(ledger_file))  # a later process
    assert 0 < first < second
    assert json.loads(ledger_file.read_text()) == {"history": [[1.0, 4 / 24, 3], [1.0, 4 / 24, 3]]}
    tight = RecordDp(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, max_epsilon=second * 1.01)
    before = adapter_state(model)
    with pytest.raises(RecordBudgetError, match="exceed dp.max-epsilon"):
        train_record_dp(model, data, cfg, tok.pad_token_id, tight, Ledger(ledger_file))
    assert all(torch.equal(v, before[k]) for k, v in adapter_state(model).items())  # not one step taken


@pytest.mark.parametrize("content", ["", "{", '{"history": [[1.0, 2.0, 3]]}', '{"history": [[0, 0.1, 3]]}', "[]"])
def test_an_unreadable_ledger_fails_closed(tmp_path, content):
    (tmp_path / "l.json").write_text(content)
    with pytest.raises(RecordBudgetError, match="unreadable"):
        Ledger(tmp_path / "l.json")
