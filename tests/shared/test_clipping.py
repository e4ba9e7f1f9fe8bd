import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.clipping import clip, update_norm


def test_update_norm_spans_all_tensors():
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(1e-6, 1e4),
    clip_norm=st.floats(1e-4, 1e2),
    seed=st.integers(0, 2**31),
)
def test_a_clipped_delta_never_exceeds_the_bound_when_its_norm_is_computed_again(scale, clip_norm, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {"a": torch.randn(7, 33, generator=g) * scale, "b": torch.randn(33, 5, generator=g) * scale}
    clipped, norm = clip(delta, clip_norm)
    assert norm == pytest.approx(update_norm(delta))
    assert update_norm(clipped) <= clip_norm
    if norm <= clip_norm:  # a delta within the bound is left as it is
        assert all(torch.equal(clipped[k], delta[k]) for k in delta)
    else:  # a clipped delta keeps its direction and lands on the bound
        assert update_norm(clipped) == pytest.approx(clip_norm, rel=1e-5)
        assert torch.allclose(clipped["a"] / clipped["b"].norm(), delta["a"] / delta["b"].norm(), rtol=1e-4)
