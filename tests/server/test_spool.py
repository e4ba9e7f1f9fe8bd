"""The round's spool: what goes in comes back, nothing unexpected is written, and nothing is left behind."""

import subprocess
import sys

import pytest
import torch

from server.modulewise import round_aggregator
from server.spool import Spool, SpoolFullError

SHAPES = {"m.lora_A.weight": (2, 5), "m.lora_B.weight": (3, 2)}


def _update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).half().float() for k, s in SHAPES.items()}


def _size(spool: Spool) -> int:
    return spool.nbytes


def test_records_come_back_as_written(tmp_path):
    updates = [_update(i) for i in range(3)]
    with Spool(SHAPES, torch.float16, tmp_path) as spool:
        for i, u in enumerate(updates):
            spool.add(u, 1.0 + i)
        assert spool.weights == [1.0, 2.0, 3.0]
        for key in SHAPES:
            assert torch.equal(spool.read(key, 0, 3), torch.stack([u[key] for u in updates]))
            assert torch.equal(spool.read(key, 1, 2)[0], updates[1][key])


def test_fp32_spool_keeps_what_fp16_would_round(tmp_path):
    update = {k: torch.full(s, 1 / 3) for k, s in SHAPES.items()}  # not an fp16 value
    with Spool(SHAPES, torch.float32, tmp_path) as spool:
        spool.add(update, 1.0)
        assert torch.equal(spool.read("m.lora_A.weight", 0, 1)[0], update["m.lora_A.weight"])


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        ({"m.lora_A.weight": torch.zeros(2, 5)}, 1.0, "keys differ"),
        ({"m.lora_A.weight": torch.zeros(2, 6), "m.lora_B.weight": torch.zeros(3, 2)}, 1.0, "not the expected"),
        (_update(0), 0.0, "weight must be > 0"),
    ],
)
def test_refuses_an_update_that_does_not_fit_without_writing(tmp_path, update, weight, message):
    with Spool(SHAPES, torch.float16, tmp_path) as spool:
        spool.add(_update(1), 1.0)
        with pytest.raises(ValueError, match=message):
            spool.add(update, weight)
        assert len(spool) == 1 and _size(spool) == spool.record_bytes


def test_budget_is_checked_before_writing(tmp_path):
    with Spool(SHAPES, torch.float16, tmp_path, max_bytes=2 * 32) as spool:  # 16 entries x 2 bytes per record
        spool.add(_update(0), 1.0)
        spool.add(_update(1), 1.0)
        with pytest.raises(SpoolFullError, match="budget"):
            spool.add(_update(2), 1.0)
        assert len(spool) == 2 and _size(spool) == 2 * spool.record_bytes


def test_leaves_no_name_in_its_folder_and_frees_its_bytes_on_close(tmp_path):
    spool = Spool(SHAPES, torch.float16, tmp_path)
    spool.add(_update(0), 1.0)
    assert spool.folder == tmp_path and list(tmp_path.iterdir()) == []
    spool.close()
    with pytest.raises(ValueError, match="closed"):  # the file (and its bytes) are gone
        spool.add(_update(1), 1.0)


def test_a_process_killed_mid_round_leaves_nothing(tmp_path):
    code = (
        "import os, signal, torch; from server.spool import Spool; "
        f"s = Spool({SHAPES!r}, torch.float16, {str(tmp_path)!r}); "
        "s.add({k: torch.zeros(v) for k, v in s.shapes.items()}, 1.0); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert list(tmp_path.iterdir()) == []


def test_closed_when_the_round_fails(tmp_path):
    with pytest.raises(RuntimeError), Spool(SHAPES, torch.float16, tmp_path) as spool:
        spool.add(_update(0), 1.0)
        raise RuntimeError("the round failed")
    assert spool._file.closed


@pytest.mark.parametrize("method", ["exact", "ties"])
def test_aggregators_close_their_spool_whether_result_succeeds_or_not(tmp_path, monkeypatch, method):
    monkeypatch.setattr("server.modulewise.DENSE_BYTES", 0)  # exact spools only where its dense sums do not fit
    glob = _update(9)
    agg = round_aggregator(method, glob, 2, 4.0, folder=tmp_path)
    with pytest.raises(ValueError, match="no updates"):
        agg.result()
    assert agg.spool._file.closed
    agg = round_aggregator(method, glob, 2, 4.0, folder=tmp_path)
    agg.add(_update(1), 1.0)
    agg.result()
    assert agg.spool._file.closed


def test_adjacent_keys_come_back_in_one_read_as_they_do_one_by_one(tmp_path):
    updates = [_update(i) for i in range(3)]
    with Spool(SHAPES, torch.float16, tmp_path) as spool:
        for u in updates:
            spool.add(u, 1.0)
        keys = list(SHAPES)
        assert spool.adjacent(keys) and not spool.adjacent(keys[::-1])
        together = spool.read_adjacent(keys, 1, 3)
        assert all(torch.equal(t, spool.read(k, 1, 3)) for t, k in zip(together, keys, strict=True))
        with pytest.raises(ValueError, match="not adjacent"):
            spool.read_adjacent(keys[::-1], 0, 3)
