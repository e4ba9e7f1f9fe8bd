"""``fleetlora infer`` keeps the device's replay state: a later session never goes back to an older release."""

from shared.cli import main
from shared.sign import public_line
from tests.client.test_export import KEY, device_model, edge_base, signed_adapter, trained_state

__all__ = ["edge_base"]  # the module-scoped fixture: a signed 4-bit tiny base and its export


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
