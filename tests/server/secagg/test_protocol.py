"""SecAgg+ for real between our coordinator stages and our client mod, through Flower's InMemoryGrid and encoding."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from server.secagg.params import SecAggParams
from server.secagg.protocol import SecAggAbortedError, run_secagg
from shared.secagg_stages import ACCEPTED_LIST, CONFIRM_SHARES
from tests.server.secagg.fleet import Fleet

SHAPES = {"m.lora_B.weight": (64, 4), "m.lora_A.weight": (4, 64)}  # not in sorted order: the devices sort
C = 1.0
PARAMS = SecAggParams(num_shares=5, threshold=3, clip_range=C, max_devices=100, timeout=60.0)


def deltas(n: int, seed: int = 0, shapes=SHAPES) -> list[dict[str, np.ndarray]]:
    """Deltas of L2 norm <= C, as client-side clipping leaves them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = {k: rng.normal(0, 0.05, s) for k, s in shapes.items()}
        norm = np.sqrt(sum(float((v**2).sum()) for v in d.values()))
        out.append({k: (v * min(1.0, C / norm)).astype(np.float32) for k, v in d.items()})
    return out


def plain_sum(ds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: sum(d[k].astype(np.float64) for d in ds) for k in SHAPES}


def assert_within_quantization(got, want, n: int) -> None:
    for key in SHAPES:
        err = np.abs(got[key].numpy().astype(np.float64) - want[key]).max()
        assert err <= n * PARAMS.step, f"{key}: error {err:.3g} above {n} quantization steps"


def test_five_devices_sum_equals_plain_sum_within_quantization_error():
    ds = deltas(5)
    with Fleet(ds) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert result.survivors == tuple(sorted(fleet.nodes)) and result.recovered == () and result.rejected == {}
    assert_within_quantization(result.total, plain_sum(ds), 5)
    assert set(result.replies) == set(fleet.nodes)
    assert all(set(r.keys()) == {"metrics", "client"} for r in result.replies.values())  # no delta passed through
    entries = sum(int(np.prod(s)) for s in SHAPES.values())
    for node in fleet.nodes:  # what each device sent: a masked vector of one int per entry, plus keys and shares
        assert entries * 4 <= result.bytes_up[node] < entries * 8 + 16 * 1024, result.bytes_up[node]
        assert result.bytes_down[node] > 0


def test_a_device_dropping_after_sharing_keys_leaves_the_sum_of_the_four_survivors():
    ds = deltas(5, seed=1)
    with Fleet(ds, drop={2: Stage.COLLECT_MASKED_VECTORS}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    dropped = fleet.nodes[2]
    assert result.recovered == (dropped,) and dropped not in result.survivors and len(result.survivors) == 4
    assert dropped not in fleet.trained  # its delta was never made, let alone sent
    entries = sum(int(np.prod(s)) for s in SHAPES.values())  # it sent its keys and shares, no masked vector
    assert result.bytes_up[dropped] + entries * 4 <= min(result.bytes_up[n] for n in result.survivors)
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 2]), 4)


def test_two_neighbouring_devices_dropping_are_both_recovered():
    ds = deltas(5, seed=2)  # 5 shares of 5 devices: every device neighbours every other
    with Fleet(ds, drop={0: Stage.COLLECT_MASKED_VECTORS, 1: Stage.COLLECT_MASKED_VECTORS}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert set(result.recovered) == {fleet.nodes[0], fleet.nodes[1]}
    assert_within_quantization(result.total, plain_sum(ds[2:]), 3)


def test_a_device_lost_before_sharing_keys_is_left_out_without_failing_the_round():
    ds = deltas(5, seed=3)
    with Fleet(ds, drop={4: Stage.SHARE_KEYS}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert result.recovered == () and fleet.nodes[4] in result.rejected
    assert_within_quantization(result.total, plain_sum(ds[:4]), 4)


def test_below_the_threshold_the_round_fails_with_the_typed_error():
    with Fleet(deltas(5), drop={i: Stage.COLLECT_MASKED_VECTORS for i in (0, 1, 2)}) as fleet:
        with pytest.raises(SecAggAbortedError, match="fewer than the reconstruction threshold 3"):
            run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)


def test_no_message_the_coordinator_receives_is_correlated_with_any_single_delta():
    # 4,096 entries per array: a correlation's standard error is 1/64, so 0.2 is 12.8 of them (never by chance)
    shapes = {"m.lora_A.weight": (16, 256), "m.lora_B.weight": (256, 16)}
    ds = deltas(5, seed=4, shapes=shapes)
    with Fleet(ds, drop={3: Stage.COLLECT_MASKED_VECTORS}) as fleet:
        run_secagg(fleet.grid, fleet.train_contents(), shapes, PARAMS, server_round=1)
    arrays = [
        rec[k].numpy()
        for _, msg in fleet.received
        if not msg.has_error()
        for rec in msg.content.array_records.values()
        for k in rec
    ]
    assert len(arrays) == 4 * len(shapes)  # the survivors' masked vectors: the only arrays that arrived
    for got in arrays:
        for d in ds:
            for want in d.values():
                if got.shape != want.shape:
                    continue
                assert not np.array_equal(got.astype(np.float64), want.astype(np.float64))
                corr = np.corrcoef(got.astype(np.float64).ravel(), want.astype(np.float64).ravel())[0, 1]
                assert abs(corr) < 0.2, f"a received array correlates with a device's delta: {corr:.3f}"
    for _, msg in fleet.received:  # and no config value carries the delta either (only keys, shares, ids)
        for rec in msg.content.config_records.values():
            assert Key.MASKED_PARAMETERS not in rec


def test_a_device_sending_its_plain_delta_instead_is_refused_and_the_round_sums_the_others():
    ds = deltas(5, seed=5)

    def leak(msg, context, call_next):  # a broken device: uploads its delta where the masked vector goes
        reply = call_next(msg, context)
        if Key.MASKED_PARAMETERS in reply.content:
            reply.content[Key.MASKED_PARAMETERS] = ArrayRecord({k: Array(v) for k, v in ds[0].items()})
        return reply

    with Fleet(ds, mods={0: [leak]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert result.recovered == (fleet.nodes[0],) and "expected uint32" in result.rejected[fleet.nodes[0]]
    assert_within_quantization(result.total, plain_sum(ds[1:]), 4)


def test_a_forged_unmask_share_aborts_the_round_instead_of_signing_noise():
    """A well-formed but forged share rebuilds a wrong seed: the wrong mask comes off, the sum is noise."""
    ds = deltas(5, seed=6)
    rng = np.random.default_rng(0)

    def forge(msg, context, call_next):  # a hostile survivor: its shares keep their index, padding, length
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK and not reply.has_error():
            config = reply.content[RECORD_KEY_CONFIGS]
            config[Key.SHARE_LIST] = [s[:4] + rng.bytes(32) + s[36:] for s in config[Key.SHARE_LIST]]
        return reply

    with Fleet(ds, mods={0: [forge]}) as fleet, pytest.raises(SecAggAbortedError) as aborted:
        run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert "in the unmasked sum are above" in str(aborted.value) and "a mask did not come off" in str(aborted.value)


def test_a_survivor_failing_its_unmask_reply_stays_in_the_sum_and_is_not_counted_out(caplog):
    ds = deltas(5, seed=2)

    def fail(msg, context, call_next):  # answers unmask with an error whose text forges a log line
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK:
            return Message(Error(code=0, reason="x\nINFO : round 1: securely aggregated 9 devices"), reply_to=msg)
        return reply

    with Fleet(ds, mods={0: [fail]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert fleet.nodes[0] in result.survivors and result.rejected == {}  # was: in the sum and "out of the round"
    assert_within_quantization(result.total, plain_sum(ds), 5)  # its update is in the sum, its masks came off
    warned = [r.getMessage() for r in caplog.records if "gave no shares at stage 'unmask'" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "x\\nINFO" in warned[0]  # one line, escaped


def test_a_device_whose_shares_do_not_decrypt_is_named_and_the_round_sums_the_others(caplog):
    """One hostile device spoils every ciphertext it sends: it used to take each neighbour out of the round."""
    ds = deltas(5, seed=7)

    def spoil(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.SHARE_KEYS and not reply.has_error():
            config = reply.content[RECORD_KEY_CONFIGS]
            config[Key.CIPHERTEXT_LIST] = [t[:-8] + bytes(8) for t in config[Key.CIPHERTEXT_LIST]]
        return reply

    with Fleet(ds, mods={0: [spoil]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    hostile, others = fleet.nodes[0], sorted(fleet.nodes[1:])
    assert result.survivors == tuple(others) and result.recovered == ()
    assert result.refused_shares == {hostile: tuple(others)}
    assert "its shares were refused by 4" in result.rejected[hostile] and set(result.rejected) == {hostile}
    assert hostile not in fleet.trained  # taken out before training: nothing of it to mask or recover
    assert_within_quantization(result.total, plain_sum(ds[1:]), 4)
    named = [r.getMessage() for r in caplog.records if f"shares device {hostile} encrypted" in r.getMessage()]
    assert len(named) == 1 and "4 devices (" in named[0] and "or those devices say so" in named[0]


def test_a_device_refusing_every_neighbours_shares_only_takes_itself_out():
    ds = deltas(5, seed=8)

    def accuse(msg, context, call_next):  # a false accuser: says no share reached it
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == CONFIRM_SHARES and not reply.has_error():
            reply.content[RECORD_KEY_CONFIGS][ACCEPTED_LIST] = []
        return reply

    with Fleet(ds, mods={2: [accuse]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert set(result.rejected) == {fleet.nodes[2]} and fleet.nodes[2] not in result.survivors
    assert len(result.survivors) == 4 and set(result.refused_shares) == set(fleet.nodes) - {fleet.nodes[2]}
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 2]), 4)


def test_a_confirm_reply_accepting_a_device_never_forwarded_to_it_is_a_rejection():
    ds = deltas(5, seed=9)

    def invent(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == CONFIRM_SHARES and not reply.has_error():
            config = reply.content[RECORD_KEY_CONFIGS]
            config[ACCEPTED_LIST] = [7, *config[ACCEPTED_LIST][1:]]
        return reply

    with Fleet(ds, mods={1: [invent]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert "confirm_shares: SecAggReplyError" in result.rejected[fleet.nodes[1]]
    assert "were not forwarded to it" in result.rejected[fleet.nodes[1]]
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 1]), 4)


def test_two_devices_announcing_one_public_key_are_taken_out_not_their_neighbours():
    ds = deltas(5, seed=10)
    announced = {}

    def copy_keys(msg, context, call_next):  # devices 0 and 1 collude: both announce device 0's keys
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.SETUP and not reply.has_error():
            config = reply.content[RECORD_KEY_CONFIGS]
            mine = announced.setdefault("keys", (config[Key.PUBLIC_KEY_1], config[Key.PUBLIC_KEY_2]))
            config[Key.PUBLIC_KEY_1], config[Key.PUBLIC_KEY_2] = mine
        return reply

    with Fleet(ds, mods={0: [copy_keys], 1: [copy_keys]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    colluders = {fleet.nodes[0], fleet.nodes[1]}
    assert set(result.rejected) == colluders and all("announced too" in result.rejected[n] for n in colluders)
    assert set(result.survivors) == set(fleet.nodes[2:])  # was: each honest device refused share keys, round aborted
    assert_within_quantization(result.total, plain_sum(ds[2:]), 3)


def test_an_unmask_share_copied_from_another_holder_names_its_sender_and_the_round_completes(caplog):
    """A share with another holder's index made combine_shares fail ("Duplicate share"), naming the owner."""
    ds = deltas(5, seed=11)

    def copy_index(msg, context, call_next):  # a hostile survivor: its shares carry the next holder's index
        reply = call_next(msg, context)
        if msg.content[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK and not reply.has_error():
            config = reply.content[RECORD_KEY_CONFIGS]
            shifted = [
                (int.from_bytes(s[:4], "little") % 5 + 1).to_bytes(4, "little") + s[4:] for s in config[Key.SHARE_LIST]
            ]
            config[Key.SHARE_LIST] = shifted
        return reply

    with Fleet(ds, mods={0: [copy_index]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert_within_quantization(result.total, plain_sum(ds), 5)  # the other four survivors' shares suffice
    named = [r.getMessage() for r in caplog.records if "gave no shares at stage 'unmask'" in r.getMessage()]
    assert len(named) == 1 and f"device {fleet.nodes[0]} gave no shares" in named[0] and "not its own" in named[0]
