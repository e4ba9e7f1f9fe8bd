import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.privacy import clip_and_pack
from shared.clipping import update_norm
from shared.wire import unpack

SHAPES = {"l0.q.lora_A.weight": (8, 64), "l0.q.lora_B.weight": (64, 8), "l1.v.lora_B.weight": (32, 8)}


@settings(max_examples=60, deadline=None)
@given(
    encoding=st.sampled_from(["fp16", "q8", "q4"]),
    scale=st.floats(1e-5, 1e3),
    clip_norm=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**31),
)
def test_what_the_coordinator_decodes_is_within_the_clip_norm_in_every_encoding(encoding, scale, clip_norm, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}
    record, norm, clipped = clip_and_pack(delta, clip_norm, encoding)
    decoded = unpack(record, SHAPES, encoding)  # exactly what the coordinator's parser decodes
    assert update_norm(decoded) <= clip_norm
    assert norm == pytest.approx(update_norm(delta))
    assert clipped == (norm > clip_norm)


def test_a_heavy_tailed_delta_in_q4_is_shrunk_until_its_decoded_norm_fits():
    # one large entry per block: q4's grid rounds the small ones up by up to half a step
    delta = {k: torch.full(s, 0.07) for k, s in SHAPES.items()}
    for t in delta.values():
        t.view(-1)[::32] = 1.0
    record, norm, clipped = clip_and_pack(delta, 0.5, "q4")
    assert clipped and update_norm(unpack(record, SHAPES, "q4")) <= 0.5
