"""``fleetlora fleet up``: a bad request is refused before any process starts (the fleet itself: test_fleet.py)."""

import json
import subprocess
import sys

import psutil

from shared.cli import main


def test_an_unknown_run_config_key_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["fleet", "up", "--dir", str(tmp_path / "fleet"), "--run-config", "no-such-key=1"]) == 2
    assert "no-such-key" in capsys.readouterr().err
    assert not (tmp_path / "fleet").exists()  # no certificates, no processes, no fleet.json


def test_fewer_nodes_than_min_clients_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["fleet", "up", "--dir", str(tmp_path / "fleet"), "--nodes", "1", "--run-config", "min-clients=2"]) == 2
    assert "min-clients = 2 needs at least that many --nodes (got 1)" in capsys.readouterr().err
    assert not (tmp_path / "fleet").exists()


def test_fleet_down_stops_the_process_fleet_json_records_and_nothing_on_a_damaged_record(tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        for bad in ("", "[]", json.dumps({"processes": {"superlink": {"pid": str(proc.pid), "started": started}}})):
            (tmp_path / "fleet").mkdir(exist_ok=True)
            (tmp_path / "fleet" / "fleet.json").write_text(bad)  # a crash, a hand, another program
            assert main(["fleet", "down", "--dir", str(tmp_path / "fleet")]) == 2
            err = capsys.readouterr().err
            assert "fleet.json" in err and "stop its processes by hand" in err and "Traceback" not in err, err
            assert proc.poll() is None  # not signalled on a record that does not parse
        folder = tmp_path / "fleet"
        (folder / "fleet.json").write_text(
            json.dumps({"processes": {"superlink": {"pid": proc.pid, "started": started}}})
        )
        assert main(["fleet", "down", "--dir", str(folder)]) == 0
        assert "stopped superlink" in capsys.readouterr().out
        assert proc.wait(timeout=60) is not None and not (folder / "fleet.json").exists()
    finally:
        proc.kill()
        proc.wait(timeout=60)
