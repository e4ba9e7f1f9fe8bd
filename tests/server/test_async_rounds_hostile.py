"""FedBuff rounds against a hostile device and bad luck: a zero delta sent at once, a device leaving mid-dispatch,
a fleet gone before the final evaluation. Through Flower's InMemoryGrid, as ``test_async_rounds.py``."""

import json
import threading
import time

import numpy as np
import torch
from flwr.common.constant import NOOP_FLWR_AID

from server.async_rounds import AsyncRounds, carried_contributions, evaluate_latest
from shared.config import AggregationConfig
from shared.wire import pack
from tests.server.secagg.fleet import Fleet
from tests.server.test_async_rounds import _deltas, _strategy

HOSTILE = 2


def _zero_delta_fleet(rounds_of):
    """Devices 0 and 1 train honestly; HOSTILE sends a zero delta at once, so it is in every buffer first."""
    deltas = _deltas()
    deltas[HOSTILE] = {k: np.zeros_like(v) for k, v in deltas[HOSTILE].items()}
    fleet = None

    def after_the_hostile(msg):  # an honest device answers once HOSTILE's update waits in the buffer
        rounds = rounds_of()
        return rounds is None or fleet.nodes[HOSTILE] not in rounds._buffer.updates

    fleet = Fleet(deltas, hold={0: after_the_hostile, 1: after_the_hostile})
    return fleet


def test_a_device_sending_a_zero_delta_at_once_cannot_veto_releases_with_the_default_buffer(tmp_path):
    strategy = _strategy(tmp_path, buffer_size=AggregationConfig().buffer_size)  # the default: 3
    rounds = None
    fleet = _zero_delta_fleet(lambda: rounds)
    rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01)
    with fleet:
        signed = rounds.run(fleet.grid, num_rounds=2)
    assert signed == 2  # with a buffer of 2 every release was refused: the honest update, > 5x the zero one


def test_a_run_whose_buffers_keep_being_refused_ends_instead_of_running_on(tmp_path, caplog):
    """A buffer of 2 (an operator's choice): the zero delta still vetoes, but the run ends and says so."""
    strategy = _strategy(tmp_path)  # buffer 2
    rounds = None
    fleet = _zero_delta_fleet(lambda: rounds)
    start = time.monotonic()
    rounds = AsyncRounds(strategy, task_timeout=5, stall_timeout=10, poll=0.01)  # a buffer takes milliseconds
    finished = threading.Event()

    def run():
        rounds.run(fleet.grid, num_rounds=1)
        finished.set()

    with fleet:
        threading.Thread(target=run, daemon=True).start()
        ended = finished.wait(120)  # stall 10 s: ends then; the old stall (no update *accepted*) never fired
        if not ended:
            rounds._rounds = 0  # stop it (it signs nothing: the loop ends at its next pass)
            finished.wait(30)
    assert ended, "the run kept going although every buffer was refused"
    assert rounds._signed_now == 0 and time.monotonic() - start < 120
    stopped = [r.getMessage() for r in caplog.records if "no release signed for" in r.getMessage()]
    assert len(stopped) == 1 and "buffers refused meanwhile" in stopped[0]
    assert int(stopped[0].split("(")[1].split()[0]) >= 1  # at least one buffer refused


class _NodeLeavesDuringDispatch:
    """The fleet's real InMemoryGrid; the second node unregisters right after the first ``get_node_ids``."""

    def __init__(self, fleet):
        self.grid, self.fleet, self.left = fleet.grid, fleet, None

    def get_node_ids(self):
        ids = list(self.grid.get_node_ids())
        if self.left is None:
            self.left = sorted(ids)[1]  # the dispatch sends to the free devices in sorted order
            self.fleet.state.delete_node(NOOP_FLWR_AID, self.left)
        return ids

    def __getattr__(self, name):
        return getattr(self.grid, name)


def test_a_device_leaving_during_a_dispatch_is_not_credited_with_another_devices_update(tmp_path, caplog):
    strategy = _strategy(tmp_path)
    fleet = Fleet(_deltas())

    def stalled(msg):  # the first device answers only once the run has stopped: the third's update must be the one
        return not any("no release signed for" in r.getMessage() for r in list(caplog.records))

    fleet.hold = {sorted(fleet.nodes)[0]: stalled}
    grid = _NodeLeavesDuringDispatch(fleet)
    with fleet:  # no task is given up (60 s): what happens is by construction, whatever the machine's speed
        rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=3, poll=0.01, retry_after=0)
        rounds.run(grid, num_rounds=1)
    trained = [nid for nid, _ in fleet.tasks]
    assert grid.left not in trained
    assert grid.left not in rounds.contributions  # was: the third device's update, credited to the one that left
    assert all(trained.count(n) == 1 for n in trained), trained  # and the third device not sent a second task


def test_the_final_evaluation_does_not_wait_for_devices_that_are_gone(tmp_path):
    strategy = _strategy(tmp_path)  # min-clients 2
    fleet = Fleet(_deltas())
    with fleet:
        for gone in fleet.nodes[1:]:  # two of three devices' SuperNodes stop (their heartbeats lapse)
            fleet.state.deactivate_node(gone)
        AsyncRounds(strategy, task_timeout=2, stall_timeout=2, poll=0.01).run(fleet.grid, num_rounds=1)
        done = threading.Event()
        threading.Thread(
            target=lambda: (evaluate_latest(strategy, fleet.grid, timeout=10), done.set()), daemon=True
        ).start()
        assert done.wait(60), "the final evaluation waited for min-clients devices to connect"
    evaluated = [nid for nid, msg in fleet.received if msg.metadata.message_type == "evaluate"]
    assert evaluated == [fleet.nodes[0]]  # the one device still connected


def test_the_round_log_says_which_updates_a_release_holds_when_an_attempt_failed(tmp_path):
    """A's and B's first updates diverge: their buffer's aggregate is refused; release 1 is A's second and C's."""
    strategy = _strategy(tmp_path)
    ds = _deltas()
    sent = {0: 0, 1: 0}

    def diverged(i):  # finite, within the norm rule (both alike), too large to sign
        def mod(msg, context, call_next):
            reply = call_next(msg, context)
            sent[i] += 1
            if sent[i] == 1:
                reply.content["arrays"] = pack({k: torch.full(v.shape, 2e4) for k, v in ds[i].items()}, "fp16")
            return reply

        return mod

    fleet = None

    def answered(i):
        return sum(1 for nid, _ in fleet.received if nid == fleet.nodes[i])

    def b_waits(msg):  # B: its diverged update, then it stays busy until release 1 is out (then its answer is late)
        return answered(1) >= 1 and strategy.registry.latest[1].round < 1

    hold = {0: lambda msg: answered(0) >= 2, 1: b_waits, 2: lambda msg: answered(0) < 2}
    fleet = Fleet(ds, mods={0: [diverged(0)], 1: [diverged(1)]}, hold=hold)
    rounds = AsyncRounds(strategy, task_timeout=60, stall_timeout=60, poll=0.01)  # no task given up: by construction
    with fleet:
        assert rounds.run(fleet.grid, num_rounds=1) == 1
    r1 = next(r for r in json.loads((tmp_path / "rounds.json").read_text())["rounds"] if r["round"] == 1)
    a, b, c = (r1["clients"][str(n)] for n in fleet.nodes)
    assert "in a buffer that was refused: its aggregate was refused" in b["rejected"]  # was: listed as accepted
    assert "rejected" not in a and "rejected" not in c and a["contributions"] == c["contributions"] == 1  # was: 2
    assert rounds.contributions == {fleet.nodes[0]: 1, fleet.nodes[2]: 1}


def test_a_resumed_run_counts_each_devices_contributions_on():
    rounds = [
        {"round": 1, "clients": {"11": {"contributions": 1}, "22": {"contributions": 1}}},
        {"round": 2, "clients": {"11": {"contributions": 2}, "22": {"contributions": 5, "rejected": "refused"}}},
        {"round": 3, "clients": {"x": {"contributions": 9}, "33": {"contributions": "7"}, "44": []}},
    ]
    assert carried_contributions(rounds) == {11: 2, 22: 1}  # malformed entries skipped, never trusted to raise
    assert carried_contributions({"not": "a list"}) == {}
