"""attach_lora: the one way a LoRA adapter is put on a base model."""

import pytest
import torch

from shared.adapter import adapter_state, attach_lora
from shared.config import LoraConfig
from shared.model import load_model


def test_a_rank_wider_than_the_narrowest_targeted_layer_is_refused_before_allocating(tiny_model_dir):
    # the tiny llama: hidden 64, 2 of 4 heads for keys and values: k_proj and v_proj are 64 -> 32
    with pytest.raises(ValueError, match=r"lora rank 33 is more than .*k_proj is wide \(32\)"):
        attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=33, alpha=33), seed=0)
    only_mlp = LoraConfig(rank=33, alpha=33, target_modules=("gate_proj", "up_proj", "down_proj"))  # 64 <-> 128
    state = adapter_state(attach_lora(load_model(str(tiny_model_dir), torch.float32), only_mlp, seed=0))
    assert {tuple(t.shape) for k, t in state.items() if "lora_A" in k} == {(33, 64), (33, 128)}
