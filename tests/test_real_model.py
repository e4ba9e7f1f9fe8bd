"""The real SmolLM2-135M-Instruct through a real Flower round, then plain peft on the result."""

from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.demo import run_demo


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, real_model_dir):
    """One real federated round of SmolLM2 on the 4-bit base (the demo's code path, shortened).

    The devices get a cache of their own: with the user's, their replay stores would pin this test's
    base, and the next ``make demo``'s devices would refuse the demo's own base as older.
    """
    tmp = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLEETLORA_CACHE", str(tmp / "device-cache"))
        return run_demo(
            {
                "model": str(real_model_dir),  # the embedded SmolLM2 folder, resolved before the cache moved
                "num-server-rounds": 1,
                "train.steps": 3,
                "eval.max-examples": 12,
                "run-name": "real",
            },
            output_dir=tmp / "out",
            flwr_home=tmp / "flwr",
        )


@pytest.mark.slow
def test_one_real_round_and_the_adapter_loads_with_plain_peft(real_run, real_model_dir, tokenizer):
    data = real_run
    rounds = {r["round"]: r for r in data["rounds"]}
    assert len(rounds[1]["clients"]) == 4
    # 2.44M LoRA parameters (r=8, all 7 linear kinds) in fp16 = ~4.9 MB up per client
    for c in rounds[1]["clients"].values():
        assert 4_800_000 < c["bytes_up"] < 5_000_000
    assert rounds[1]["mean_heldout_loss"] < rounds[0]["mean_heldout_loss"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, data["run"]["adapter"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": 'Define "apple pie".'}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.split()) >= 2, text


@pytest.mark.slow
def test_the_edge_runtime_serves_the_federated_adapter_like_pytorch(real_run, monkeypatch, tmp_path):
    """ONNX Runtime INT4 (int8 activations) + the run's signed adapter vs PyTorch on the same 4-bit codes."""
    from client.infer import EdgeModel
    from shared.adapter import attach_lora, load_adapter_state
    from shared.config import LoraConfig
    from shared.model import load_model
    from shared.release import follow_latest, load_tensors
    from shared.sign import TrustList
    from simulations.demo_infer import answer_per_domain

    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))  # a device's fresh cache: exports once
    run = real_run["run"]
    text = answer_per_domain(run)  # what make demo prints last
    for topic in ("noun.animal", "noun.food", "noun.artifact", "verb.motion"):
        assert f"[{topic}]" in text
    assert text.count("  base     : ") == 4 and text.count("  federated: ") == 4 and "round 1" in text

    releases = Path(run["releases"])
    base = releases.parents[1] / "base"
    edge = EdgeModel(base, TrustList.load(run["config"]["signing.trust-file"]), tmp_path / "cache")
    release = edge.apply_release(follow_latest(releases))
    model = attach_lora(load_model(str(base), torch.float32), LoraConfig(), seed=0).eval()
    load_adapter_state(model, load_tensors((follow_latest(releases) / "adapter_model.safetensors").read_bytes()))
    assert release.round == 1
    for prompt in ('Define "otter".', 'What kind of thing is "a bagel"?', 'Define the verb "stroll".'):
        ids = edge.prompt_ids(prompt)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        got = edge.logits(ids)
        # int8 activations (the fast path) move logits by < 1 on a scale of ~30 (measured 0.56-0.89)
        diff = float(np.abs(got - ref).max())
        assert diff < 0.05 * np.abs(ref).max()
        # the token ONNX picks is PyTorch's best, or tied with it within that error (seen: a near-tie flips)
        assert ref[int(got.argmax())] >= ref.max() - 2 * diff
