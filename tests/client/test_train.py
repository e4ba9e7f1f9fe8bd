import contextlib
import os
import subprocess
import sys

import pytest
import torch

from client.partition import partition_for
from client.train import _common_prefix, evaluate, lora_in_compute_dtype, response_nll, train_adapter
from shared.adapter import adapter_state, attach_lora, causal_lm, load_adapter_state
from shared.config import EvalConfig, FleetConfig, LoraConfig, TrainConfig
from shared.data import DataError, collate, encode, load_jsonl
from shared.model import load_model
from shared.wire import from_wire, to_wire
from tests.conftest import DATA, REPO


@pytest.fixture
def tiny_lora(tiny_model_dir):
    return attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=0)


@pytest.fixture
def food(tokenizer):
    return [encode(ex, tokenizer, 96) for ex in load_jsonl(DATA / "noun.food" / "train.jsonl")[:64]]


def test_response_nll_equals_transformers_loss(tiny_lora, food, tokenizer):
    batch = collate(food[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        nll, count = response_nll(tiny_lora, batch)
        reference = tiny_lora(**batch).loss  # mean over labelled tokens, full-vocab logits everywhere
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert nll.item() / count == pytest.approx(reference.item(), rel=1e-5)


def test_the_shared_prefix_gives_the_plain_paths_loss_and_lora_gradients(tiny_lora, food, tokenizer):
    """The system prompt runs once per batch; loss and every LoRA factor's gradient are the plain path's."""
    torch.manual_seed(0)
    for name, param in tiny_lora.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every gradient of A zero, hiding a wrong one
            param.data.normal_(0, 0.1)
    batch = collate(food[:4], tokenizer.pad_token_id)
    assert _common_prefix(batch["input_ids"], batch["attention_mask"]) >= 16  # SmolLM2's default system prompt
    results = {}
    for share in (True, False):
        tiny_lora.zero_grad(set_to_none=True)
        nll, count = response_nll(tiny_lora, batch, share)
        nll.backward()
        grads = {n: p.grad.clone() for n, p in tiny_lora.named_parameters() if p.requires_grad}
        results[share] = (nll.item(), count, grads)
    (shared_nll, shared_count, shared), (plain_nll, plain_count, plain) = results[True], results[False]
    assert shared_count == plain_count and shared_nll == pytest.approx(plain_nll, rel=1e-5)
    assert set(shared) == set(plain) and any("lora_A" in n and ".k_proj" in n for n in shared)
    for name, grad in plain.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in plain.values())


def test_training_lowers_loss_and_touches_only_lora(tiny_lora, food, tokenizer):
    base_before = {k: v.clone() for k, v in tiny_lora.named_parameters() if "lora_" not in k}
    before = evaluate(tiny_lora, food, EvalConfig(max_examples=16), tokenizer.pad_token_id).loss
    result = train_adapter(
        tiny_lora, food, TrainConfig(steps=25, batch_size=8, lr=5e-3), tokenizer.pad_token_id, seed=1
    )
    after = evaluate(tiny_lora, food, EvalConfig(max_examples=16), tokenizer.pad_token_id).loss
    assert after < before - 0.1
    assert result.steps == 25
    for name, param in tiny_lora.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), f"frozen base weight {name} changed"


def test_same_seed_gives_the_same_initial_adapter(tiny_model_dir):
    a = adapter_state(attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=7))
    b = adapter_state(attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=7))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if "lora_B" in k)  # B = 0: starts as the base


def test_wire_round_trip_is_fp16_and_keyed_like_peft(tiny_lora):
    state = adapter_state(tiny_lora)
    record = to_wire(state)
    back = from_wire(record)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in back)
    assert all(torch.equal(back[k], state[k].half().float()) for k in state)


def test_loading_a_mismatched_adapter_is_refused(tiny_lora):
    state = adapter_state(tiny_lora)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(tiny_lora, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state(tiny_lora, {**state, key: torch.zeros(3, 3)})


def test_partition_comes_from_node_config_or_simulation_topic(tmp_path):
    cfg = FleetConfig(data_dir=str(DATA), topics=("noun.food", "verb.motion"))
    assert partition_for({"partition-id": 1, "num-partitions": 4}, cfg).name == "verb.motion"
    fourth = partition_for({"partition-id": 3, "num-partitions": 4}, cfg)  # more devices than topics
    assert fourth.name == "verb.motion-3" and fourth.train_file == DATA / "verb.motion" / "train.jsonl"
    own = partition_for({"train-file": str(tmp_path / "t.jsonl"), "name": "clinic-7"}, cfg)
    assert own.name == "clinic-7" and own.train_file == tmp_path / "t.jsonl"
    with pytest.raises(DataError, match="no data folder for topic 'noun.nothing'"):
        partition_for({"partition-id": 0}, FleetConfig(data_dir=str(DATA), topics=("noun.nothing",)))


def test_micro_batches_and_checkpointing_give_the_same_update(tiny_model_dir, food, tokenizer):
    def one_step(**kw):
        model = attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=0)
        train_adapter(model, food, TrainConfig(steps=2, batch_size=8, lr=1e-2, **kw), tokenizer.pad_token_id, seed=3)
        return adapter_state(model)

    full = one_step()
    for kw in ({"micro_batch_size": 3}, {"micro_batch_size": 1, "gradient_checkpointing": 1}):
        other = one_step(**kw)
        assert all(torch.allclose(full[k], other[k], atol=1e-5) for k in full), kw


def _saved_bytes_and_grads(model, batch, amp):
    """Bytes autograd keeps for one forward/backward (each storage once), the loss and the LoRA gradients."""
    model.zero_grad(set_to_none=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    no_cast, autocast = lora_in_compute_dtype(model) if amp else (contextlib.nullcontext(), contextlib.nullcontext)
    with no_cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast():
            nll, _ = response_nll(model, batch, share_prefix=False)
        nll.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(storages.values()), nll.item(), grads


def test_over_a_bf16_base_lora_computes_in_bf16_keeps_less_and_learns_the_same(tiny_model_dir, food, tokenizer):
    """No fp32 copy of each LoRA input is kept for the backward pass; the fp32 factors get the fp32 path's gradients."""
    model = attach_lora(load_model(str(tiny_model_dir), torch.bfloat16), LoraConfig(rank=4), seed=0)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every gradient of A zero
            param.data.normal_(0, 0.1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # what AdamW updates
    batch = collate(food[:4], tokenizer.pad_token_id)
    plain_bytes, plain_nll, plain = _saved_bytes_and_grads(model, batch, amp=False)
    amp_bytes, amp_nll, amp = _saved_bytes_and_grads(model, batch, amp=True)
    assert amp_bytes < 0.75 * plain_bytes, (amp_bytes, plain_bytes)
    assert amp_nll == pytest.approx(plain_nll, rel=1e-2)
    assert all(g.dtype == torch.float32 for g in amp.values())
    for name, grad in plain.items():
        cosine = torch.nn.functional.cosine_similarity(amp[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_checkpointing_on_a_4bit_base_gives_the_same_update(tiny_int4_dir, food, tokenizer, monkeypatch):
    """The recomputation keeps W for its backward, reuses the first pass's attention, skips the down projection.

    Same adapter as without checkpointing; attention ran once per layer and step, not twice; every
    flag is off again after.
    """
    import client.checkpointing
    import shared.int4_layer

    flash, products = client.checkpointing._FLASH, shared.int4_layer._Int4MatMul.forward
    calls = {"attention": 0, "skipped": 0}

    def counted(*args, **kwargs):
        calls["attention"] += 1
        return flash(*args, **kwargs)

    def product(ctx, x, codes, scales, mins, keep, compute):
        calls["skipped"] += not compute
        return products(ctx, x, codes, scales, mins, keep, compute)

    monkeypatch.setattr(client.checkpointing, "_FLASH", counted)
    monkeypatch.setattr(shared.int4_layer._Int4MatMul, "forward", staticmethod(product))

    def two_steps(**kw):
        model = attach_lora(load_model(str(tiny_int4_dir), torch.float32), LoraConfig(rank=4), seed=0)
        train_adapter(model, food, TrainConfig(steps=2, batch_size=8, lr=1e-2, **kw), tokenizer.pad_token_id, seed=3)
        assert not any(getattr(m, "keep_dequantized", False) for m in model.modules())
        return adapter_state(model)

    plain, checkpointed = two_steps(), two_steps(gradient_checkpointing=1)
    layers = 2  # the tiny base's; 2 steps of one batch each
    assert calls == {"attention": 2 * layers, "skipped": 2 * layers}
    assert plain.keys() == checkpointed.keys()
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(torch.count_nonzero(v) for k, v in plain.items() if "lora_B" in k)  # it did train


def test_a_round_that_fails_leaves_the_model_as_it_found_it(tiny_int4_dir, food, monkeypatch):
    """No checkpointing, kept weights or disabled casts survive an exception into evaluation or the next round."""
    import client.train

    model = attach_lora(load_model(str(tiny_int4_dir), torch.bfloat16), LoraConfig(rank=4), seed=0)
    real, calls = client.train.response_nll, []

    def failing(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)  # the forward pass ran: checkpointed layers kept their attention outputs
        if len(calls) == 2:
            raise FloatingPointError("training loss became nan; lower train.lr")
        return out

    monkeypatch.setattr(client.train, "response_nll", failing)
    with pytest.raises(FloatingPointError):
        train_adapter(model, food, TrainConfig(steps=3, batch_size=4, gradient_checkpointing=1), 0, seed=0)
    assert len(calls) == 2 and not model.training
    assert not model.is_activation_checkpointing
    for m in model.modules():
        assert not getattr(m, "keep_dequantized", False) and getattr(m, "skip_output_when", None) is None
        assert "_fleetlora_kept" not in vars(m)  # no attention output left from the first pass
    assert causal_lm(model).config._attn_implementation == "sdpa"
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_training_bounds_onednns_caches_unless_the_operator_set_them():
    """A new matmul shape per step must not grow the process for ever (client.train.ONEDNN_CACHE)."""
    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    code = f"import os, client.train; print(*(os.environ[n] for n in {names!r}))"
    env = {k: v for k, v in os.environ.items() if k not in names}

    def run(**extra: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, cwd=REPO, capture_output=True,
                             text=True, timeout=300, check=True)  # fmt: skip
        return out.stdout.split()

    assert run() == ["64", "64"]
    assert run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="5") == ["5", "64"]


def test_training_on_the_4bit_base_with_checkpointing_warns_of_nothing(tiny_int4_dir, food, tokenizer):
    """No warning an operator reads as a fault: peft's 'unsupported layer' for our own 4-bit layer, deprecated
    transformers names, a cache that checkpointing has to switch off."""
    import logging
    import warnings

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = attach_lora(load_model(str(tiny_int4_dir), torch.float32), LoraConfig(rank=4), seed=0)
            cfg = TrainConfig(steps=1, batch_size=4, gradient_checkpointing=1)
            train_adapter(model, food, cfg, tokenizer.pad_token_id, seed=0)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in said if "cache" in m.lower() or "deprecated" in m.lower()], said
