"""On-device inference: a later session never goes back to an older release, and a non-finite one is refused."""

import numpy as np
import pytest
import torch

from client.infer import EdgeModel
from shared.cli import main
from shared.errors import ReleaseError
from shared.sign import public_line
from tests.client.test_export import EXACT, KEY, TRUST, device_model, signed_adapter, trained_state


def test_a_later_infer_session_refuses_an_older_round(edge_base, tmp_path, capsys):
    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    model = device_model(edge_base.base)
    run, state = tmp_path / "run", tmp_path / "accepted.json"
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    signed_adapter(run / "round-0002", model, trained_state(model, 2), edge_base.base, 2, edge_base.digest)
    common = ["--base", str(edge_base.base), "--trust", str(trust), "--cache", str(edge_base.root / "cache")]
    common += ["--state", str(state), "--max-new-tokens", "2"]
    assert main(["infer", *common, "--adapter", str(run / "round-0002"), "Define 'otter'."]) == 0
    capsys.readouterr()
    assert main(["infer", *common, "--adapter", str(run / "round-0001"), "Define 'otter'."]) == 2  # a new session
    assert "replay: round 1 of run run is not newer than the accepted round 2" in capsys.readouterr().err
    assert main(["infer", *common, "--no-adapter", "Define 'otter'."]) == 0  # the base itself stays pinned, usable


def test_a_non_finite_adapter_is_refused_and_the_active_one_stays(edge_base, tmp_path):
    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    good, m1 = signed_adapter(tmp_path / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    edge.apply_release(good)
    ids = edge.prompt_ids("Define 'hammer'.")
    before = edge.logits(ids)
    poisoned = trained_state(model, 2)
    key = sorted(k for k in poisoned if "lora_B" in k)[0]
    poisoned[key][0, 0] = float("nan")
    bad, _ = signed_adapter(tmp_path / "a2", model, poisoned, edge_base.base, 2, edge_base.digest)
    with pytest.raises(ReleaseError, match="non-finite"):
        edge.apply_release(bad)
    assert edge.active is not None and edge.active.manifest == m1
    np.testing.assert_array_equal(edge.logits(ids), before)
    assert torch.isfinite(torch.from_numpy(before)).all()
