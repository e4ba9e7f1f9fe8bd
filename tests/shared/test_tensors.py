"""The adapter tensor codec: fp16 safetensors out, strictly parsed tensors in; bad bytes are a clean refusal."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_file_bytes
from safetensors.torch import save as torch_save

from shared.errors import ReleaseError
from shared.tensors import load_arrays, load_tensors, save_tensors


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


def test_the_numpy_view_parses_the_same_release_bytes_as_torch():
    state = {"b": torch.randn(3, 2), "a": torch.randn(4)}
    data = save_tensors(state)
    arrays, tensors = load_arrays(data), load_tensors(data)
    assert set(arrays) == {"a", "b"} and all(a.dtype == np.float32 for a in arrays.values())
    assert all(np.array_equal(arrays[k], tensors[k].numpy()) for k in state)


def test_the_numpy_view_refuses_integer_and_bfloat16_tensors_by_name():
    with pytest.raises(ReleaseError, match="'codes' is int8"):
        load_arrays(save_file_bytes({"codes": np.zeros(4, np.int8)}))
    with pytest.raises(ReleaseError, match="not valid safetensors"):
        load_arrays(torch_save({"w": torch.zeros(4, dtype=torch.bfloat16)}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_numpy_parsing_never_crashes(data):
    try:
        load_arrays(data)
    except ReleaseError:
        pass
