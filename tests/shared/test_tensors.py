"""The adapter tensor codec: fp16 safetensors out, strictly parsed tensors in; bad bytes are a clean refusal."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ReleaseError
from shared.tensors import load_tensors, save_tensors


def test_tensors_round_trip_as_fp16():
    state = {"b": torch.randn(3, 2), "a": torch.randn(4)}
    back = load_tensors(save_tensors(state))
    assert set(back) == {"a", "b"} and all(torch.allclose(back[k], state[k], atol=1e-2) for k in state)
    assert all(v.dtype == torch.float32 for v in back.values())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_safetensors_parsing_never_crashes(data):
    try:
        load_tensors(data)
    except ReleaseError:
        pass
