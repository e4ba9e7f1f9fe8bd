"""``fleetlora fleet up``: a bad request is refused before any process starts (the fleet itself: test_fleet.py)."""

from shared.cli import main


def test_an_unknown_run_config_key_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["fleet", "up", "--dir", str(tmp_path / "fleet"), "--run-config", "no-such-key=1"]) == 2
    assert "no-such-key" in capsys.readouterr().err
    assert not (tmp_path / "fleet").exists()  # no certificates, no processes, no fleet.json


def test_fewer_nodes_than_min_clients_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["fleet", "up", "--dir", str(tmp_path / "fleet"), "--nodes", "1", "--run-config", "min-clients=2"]) == 2
    assert "min-clients = 2 needs at least that many --nodes (got 1)" in capsys.readouterr().err
    assert not (tmp_path / "fleet").exists()
