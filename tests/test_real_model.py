"""The real SmolLM2-135M-Instruct through a real Flower round, then plain peft on the result."""

import pytest
import torch

from simulations.demo import run_demo


@pytest.mark.slow
def test_one_real_round_and_the_adapter_loads_with_plain_peft(tmp_path, real_model_dir, tokenizer):
    data = run_demo(
        {"num-server-rounds": 1, "train.steps": 3, "eval.max-examples": 12, "run-name": "real"},
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
    )
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
