"""The device's SecAgg+ mod against a hostile coordinator: it reveals only what the protocol allows, once."""

import time
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from client.secagg import SecAggDeviceError, secagg_mod
from shared.secagg_stages import ACCEPTED_LIST, CONFIRM_SHARES
from tests.server.messages import through_flower

NODES = (11, 22, 33)
SETUP = {"sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 1.0, "target_range": 1 << 20}
SETUP["mod_range"] = 1 << 32
DELTA = {"w": np.full((4, 8), 0.25, dtype=np.float32)}


def ins(nid: int, stage: str, values: dict, group: str = "1", extra: dict | None = None) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"i{nid}{stage}",
        src_node_id=0,
        dst_node_id=nid,
        reply_to_message_id="",
        group_id=group,
        created_at=time.time(),
        ttl=60,
        message_type="train",
    )
    if stage == Stage.COLLECT_MASKED_VECTORS and extra is None:  # the round's train content names its server round
        extra = {"config": ConfigRecord({"server-round": int(group)})}
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **values}), **(extra or {})})
    return through_flower(Message(content, metadata=meta))


def train(delta: dict):
    def call_next(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({k: Array(v) for k, v in delta.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return call_next


def send(ctx: Context, msg: Message, call_next=None) -> RecordDict:
    return through_flower(secagg_mod(msg, ctx, call_next or train(DELTA))).content


def devices() -> dict[int, Context]:
    return {n: Context(1, n, {}, RecordDict(), {}) for n in NODES}


def to_confirm(ctxs: dict[int, Context], setup: dict = SETUP) -> dict[int, dict]:
    """Run setup and share keys honestly for every device; return what each gets in the confirm stage."""
    keys = {n: send(c, ins(n, Stage.SETUP, setup))[RECORD_KEY_CONFIGS] for n, c in ctxs.items()}
    table = {str(n): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for n, k in keys.items()}
    forwarded: dict[int, dict] = {n: {Key.SOURCE_LIST: [], Key.CIPHERTEXT_LIST: []} for n in ctxs}
    for n, c in ctxs.items():
        out = send(c, ins(n, Stage.SHARE_KEYS, table))[RECORD_KEY_CONFIGS]
        for dst, text in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):
            forwarded[dst][Key.SOURCE_LIST].append(n)
            forwarded[dst][Key.CIPHERTEXT_LIST].append(text)
    return forwarded


def to_collect(ctxs: dict[int, Context], setup: dict = SETUP) -> dict[int, dict]:
    """Run setup, share keys and confirm honestly; return each device's links for the collect stage."""
    forwarded = to_confirm(ctxs, setup)
    replies = {n: send(c, ins(n, CONFIRM_SHARES, forwarded[n])) for n, c in ctxs.items()}
    kept = {n: r[RECORD_KEY_CONFIGS][ACCEPTED_LIST] for n, r in replies.items()}
    return {n: {Key.SOURCE_LIST: [s for s in kept[n] if n in kept[s]]} for n in ctxs}


def masked(ctxs: dict[int, Context]) -> dict[int, RecordDict]:
    forwarded = to_collect(ctxs)
    return {n: send(c, ins(n, Stage.COLLECT_MASKED_VECTORS, forwarded[n])) for n, c in ctxs.items()}


def test_the_delta_leaves_the_device_masked_and_the_masks_cancel_in_the_sum():
    ctxs = devices()
    out = masked(ctxs)
    for content in out.values():
        assert set(content.keys()) == {"metrics", Key.MASKED_PARAMETERS}  # the plain delta is gone
        values = content[Key.MASKED_PARAMETERS]["w"].numpy()
        assert values.dtype == np.uint32 and len(np.unique(values)) > 16  # uniform-looking, not 0.25 everywhere
    total = sum(c[Key.MASKED_PARAMETERS]["w"].numpy().astype(np.int64) for c in out.values()) % (1 << 32)
    assert total.std() > 1e6  # the private masks stay until the unmask stage


def test_the_round_state_lives_in_the_context_not_in_the_process():
    a, b = devices()[11], devices()[22]
    send(a, ins(11, Stage.SETUP, SETUP))
    assert RECORD_KEY_STATE in a.state.config_records and RECORD_KEY_STATE not in b.state.config_records
    with pytest.raises(SecAggDeviceError, match="after ''"):  # b never ran setup, whatever a did
        send(b, ins(22, Stage.SHARE_KEYS, {}))


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("threshold", 1, "must be more than half"),  # 1 of 3: one share would rebuild both secrets
        ("share_num", 4, "4 shares for 3 devices"),
        ("mod_range", 3 << 30, "modulus"),
        ("target_range", 1 << 31, "levels for 3 devices"),  # 3 * 2**31 overflows 2**32
        ("clipping_range", float("nan"), "clip range"),
    ],
)
def test_setup_parameters_the_protocol_cannot_honour_are_refused(key, value, reason):
    with pytest.raises(SecAggDeviceError, match=reason):
        send(devices()[11], ins(11, Stage.SETUP, {**SETUP, key: value}))


def test_more_shares_than_a_device_splits_in_bounded_time_are_refused():
    many = {**SETUP, "sample_num": 1000, "share_num": 257, "threshold": 129, "target_range": 1 << 20}
    with pytest.raises(SecAggDeviceError, match="257 shares for 1000 devices"):  # 74 s of CPU at 800, ~ shares^2
        send(devices()[11], ins(11, Stage.SETUP, many))


def test_stages_out_of_order_or_of_another_round_are_refused():
    ctx = devices()[11]
    with pytest.raises(SecAggDeviceError, match="after ''"):
        send(ctx, ins(11, Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [11], Key.DEAD_NODE_ID_LIST: []}))
    send(ctx, ins(11, Stage.SETUP, SETUP))
    with pytest.raises(SecAggDeviceError, match="another round"):
        send(ctx, ins(11, Stage.SHARE_KEYS, {}, group="2"))


def test_share_keys_with_its_own_key_replaced_is_refused():
    ctxs = devices()
    keys = {n: send(c, ins(n, Stage.SETUP, SETUP))[RECORD_KEY_CONFIGS] for n, c in ctxs.items()}
    table = {str(n): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for n, k in keys.items()}
    table["11"] = table["22"][::-1]
    with pytest.raises(SecAggDeviceError, match="own public keys"):
        send(ctxs[11], ins(11, Stage.SHARE_KEYS, table))


def test_unmask_reveals_one_kind_of_share_per_neighbour_and_only_once():
    ctxs = devices()
    masked(ctxs)
    both = {Key.ACTIVE_NODE_ID_LIST: [11, 22], Key.DEAD_NODE_ID_LIST: [22]}
    with pytest.raises(SecAggDeviceError, match="both survived and dropped"):
        send(ctxs[11], ins(11, Stage.UNMASK, both))
    ctxs = devices()
    masked(ctxs)
    honest = {Key.ACTIVE_NODE_ID_LIST: [11, 22], Key.DEAD_NODE_ID_LIST: [33]}
    out = send(ctxs[11], ins(11, Stage.UNMASK, honest))[RECORD_KEY_CONFIGS]
    assert out[Key.NODE_ID_LIST] == [11, 22, 33] and len(out[Key.SHARE_LIST]) == 3
    with pytest.raises(SecAggDeviceError, match="after 'unmask'"):  # a second request: the other kind of 33's share
        send(ctxs[11], ins(11, Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [11, 22, 33], Key.DEAD_NODE_ID_LIST: []}))


def test_unmask_with_fewer_survivors_than_the_threshold_is_refused():
    ctxs = devices()
    masked(ctxs)
    with pytest.raises(SecAggDeviceError, match="fewer survivors than the threshold"):
        send(ctxs[11], ins(11, Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [11], Key.DEAD_NODE_ID_LIST: [22, 33]}))


def test_confirm_keeps_the_shares_that_decrypt_and_names_the_rest_without_stopping():
    ctxs = devices()
    forwarded = to_confirm(ctxs)
    texts = forwarded[11][Key.CIPHERTEXT_LIST]
    at = forwarded[11][Key.SOURCE_LIST].index(22)
    texts[at] = texts[at][:-8] + bytes(8)  # 22's shares for 11, spoiled (by 22 or on the way: 11 cannot tell)
    out = send(ctxs[11], ins(11, CONFIRM_SHARES, forwarded[11]))[RECORD_KEY_CONFIGS]
    assert out[ACCEPTED_LIST] == [33]  # was: the round's end for 11 (Fernet's InvalidToken at collect)
    with pytest.raises(SecAggDeviceError, match="whose shares it does not hold"):  # a link it never confirmed
        send(ctxs[11], ins(11, Stage.COLLECT_MASKED_VECTORS, {Key.SOURCE_LIST: [22, 33]}))


def test_shares_that_name_another_pair_or_are_not_shares_are_not_kept():
    ctxs = devices()
    forwarded = to_confirm(ctxs)
    to_11, to_22 = forwarded[11], forwarded[22]
    swapped = {**to_11, Key.CIPHERTEXT_LIST: list(to_11[Key.CIPHERTEXT_LIST])}
    # 33's ciphertext for 22, forwarded to 11 as if from 33: it names the pair (33, 22), not (33, 11)
    swapped[Key.CIPHERTEXT_LIST][to_11[Key.SOURCE_LIST].index(33)] = to_22[Key.CIPHERTEXT_LIST][
        to_22[Key.SOURCE_LIST].index(33)
    ]
    out = send(ctxs[11], ins(11, CONFIRM_SHARES, swapped))[RECORD_KEY_CONFIGS]
    assert out[ACCEPTED_LIST] == [22]


def test_a_confirm_forwarding_from_devices_that_are_not_neighbours_is_refused():
    ctxs = devices()
    forwarded = to_confirm(ctxs)
    bad = {Key.SOURCE_LIST: [22, 44], Key.CIPHERTEXT_LIST: forwarded[11][Key.CIPHERTEXT_LIST]}
    with pytest.raises(SecAggDeviceError, match="not its neighbours"):
        send(ctxs[11], ins(11, CONFIRM_SHARES, bad))


def test_a_delta_that_is_not_finite_is_never_masked():
    ctxs = devices()
    forwarded = to_collect(ctxs)
    bad = {"w": np.full((4, 8), np.nan, dtype=np.float32)}
    with pytest.raises(SecAggDeviceError, match="not finite"):
        send(ctxs[11], ins(11, Stage.COLLECT_MASKED_VECTORS, forwarded[11]), train(bad))
    assert ctxs[11].state.config_records[RECORD_KEY_STATE]["stage"] == "aborted"  # its secrets are forgotten


def test_messages_without_a_secagg_record_pass_through():
    msg = ins(11, Stage.SETUP, SETUP)
    del msg.content[RECORD_KEY_CONFIGS]
    assert "arrays" in secagg_mod(msg, devices()[11], train(DELTA)).content


@pytest.mark.parametrize(
    ("layout", "most"),
    [
        ({"w": (100_000,)}, 20),  # one tensor: Flower's quantize's float64 temporaries (~10x); was ~12x
        ({f"m{i}.lora_{f}": (576, 8) if f == "A" else (8, 576) for i in range(60) for f in "AB"}, 4),  # ~2x; was ~8x
    ],
    ids=["one tensor", "an adapter's 120 small tensors"],
)
def test_masking_memory_does_not_grow_with_the_neighbours(layout, most):
    """Memory of the collect stage: uint32 codes masked in place, one pair's mask of one tensor at a time."""
    n = 17  # a coordinator may ask 255 shares: every mask held before adding was ~45x the delta at 17
    setup = {**SETUP, "sample_num": n, "share_num": n, "threshold": n // 2 + 1, "target_range": (1 << 32) // n - 1}
    ctxs = {nid: Context(1, nid, {}, RecordDict(), {}) for nid in range(1, n + 1)}
    forwarded = to_collect(ctxs, setup)
    delta = {k: np.full(shape, 0.01, dtype=np.float32) for k, shape in layout.items()}
    size = sum(v.nbytes for v in delta.values())
    tracemalloc.start()
    try:
        out = send(ctxs[1], ins(1, Stage.COLLECT_MASKED_VECTORS, forwarded[1]), train(delta))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert Key.MASKED_PARAMETERS in out
    assert peak < most * size, f"{peak / size:.1f}x the delta"


def test_a_collect_that_names_no_server_round_is_refused():
    """The mod binds what it signs (the group id) to the round the train handler masks once: it must be named."""
    for extra in ({}, {"config": ConfigRecord({"server-round": "1"})}, {"config": ConfigRecord({"server-round": 2})}):
        ctxs = devices()  # a refusal forgets the round: a fresh one each time
        forwarded = to_collect(ctxs)
        with pytest.raises(SecAggDeviceError, match="for another round"):
            send(ctxs[11], ins(11, Stage.COLLECT_MASKED_VECTORS, forwarded[11], extra=extra))
