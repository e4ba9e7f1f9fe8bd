"""The trust boundary: each device reply parsed into a typed, bounded value, or refused by name."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.replies import (
    EvalReply,
    Refusal,
    ReplyError,
    TrainReply,
    UpdateSpec,
    decode_update,
    parse_evaluate,
    parse_train,
)
from shared.wire import SCALE_SUFFIX, pack
from tests.server.messages import message, through_flower

torch.manual_seed(0)
GLOBAL = {"m.lora_A.weight": torch.randn(4, 64) * 0.1, "m.lora_B.weight": torch.randn(64, 4) * 0.1}
SPEC = UpdateSpec(GLOBAL, "fp16", max_examples=10_000)
TRAIN = {"num-examples": 500, "train-loss": 1.5, "train-seconds": 3.0}


def train_reply(metrics=None, arrays=None, client=None) -> Message:
    records = {
        "arrays": arrays if arrays is not None else pack({k: torch.zeros_like(v) for k, v in GLOBAL.items()}),
        "metrics": MetricRecord(TRAIN if metrics is None else metrics),
        "client": ConfigRecord({"name": "food"} if client is None else client),
    }
    return through_flower(message(records))


def test_an_honest_train_reply_parses_into_typed_values():
    reply = parse_train(train_reply({**TRAIN, "base-download-bytes": 123}), 7, SPEC)
    assert isinstance(reply, TrainReply)
    assert (reply.node_id, reply.name, reply.num_examples, reply.train_loss) == (7, "food", 500, 1.5)
    assert reply.base_download_bytes == 123
    assert set(decode_update(reply, SPEC)) == set(GLOBAL)


def test_a_train_reply_may_withhold_its_loss():
    """Under record-level DP a device does not send its train loss (it is not noised: at batch 1, one example's)."""
    reply = parse_train(train_reply({k: v for k, v in TRAIN.items() if k != "train-loss"}), 7, SPEC)
    assert isinstance(reply, TrainReply) and reply.train_loss is None and reply.num_examples == 500


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({**TRAIN, "num-examples": math.inf}, r"'num-examples' = inf is not an integer"),
        ({**TRAIN, "num-examples": 1e30}, r"'num-examples' = 1e\+30 is not an integer"),
        ({**TRAIN, "num-examples": 2**63}, r"'num-examples' = 9223372036854775808 is outside \[1, 10000\]"),
        ({**TRAIN, "num-examples": 2**64 - 1}, r"outside \[1, 10000\]"),
        ({**TRAIN, "num-examples": 0}, r"outside \[1, 10000\]"),
        ({**TRAIN, "num-examples": 10_001}, r"outside \[1, 10000\]"),
        ({**TRAIN, "train-loss": math.inf}, r"'train-loss' = inf is not finite"),
        ({**TRAIN, "train-loss": math.nan}, r"'train-loss' = nan is not finite"),
        ({**TRAIN, "train-loss": -1.0}, r"'train-loss' = -1.0 is outside"),
        ({k: v for k, v in TRAIN.items() if k != "num-examples"}, r"lack 'num-examples'"),
        ({**TRAIN, "num-examples": [1, 2]}, r"is not an integer"),
        ({**TRAIN, "extra": [1.0, 2.0]}, r"unexpected keys \['extra'\]"),
    ],
)
def test_each_hostile_metric_is_refused_by_name(metrics, reason):
    with pytest.raises(ReplyError, match=reason):
        parse_train(train_reply(metrics), 7, SPEC)


def test_records_must_be_exactly_those_of_the_phase():
    records = {"metrics2": MetricRecord({"x": 1.0}), **train_reply().content}  # a second MetricRecord, first
    with pytest.raises(ReplyError, match=r"unexpected \['metrics2'\]"):
        parse_train(through_flower(message(records)), 7, SPEC)
    no_arrays = {k: v for k, v in train_reply().content.items() if k != "arrays"}
    with pytest.raises(ReplyError, match=r"missing \['arrays'\]"):
        parse_train(through_flower(message(no_arrays)), 7, SPEC)
    swapped = {**train_reply().content, "metrics": ConfigRecord({"num-examples": 5})}
    with pytest.raises(ReplyError, match="'metrics' record is a ConfigRecord"):
        parse_train(through_flower(message(swapped)), 7, SPEC)


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ({"name": "x" * 129}, "not 1 to 128 printable"),
        ({"name": "a\nb"}, "not 1 to 128 printable"),
        ({"name": 5}, "not 1 to 128 printable"),
        ({"name": "food", "role": "admin"}, r"unexpected keys \['role'\]"),
    ],
)
def test_the_client_record_is_bounded(client, reason):
    with pytest.raises(ReplyError, match=reason):
        parse_train(train_reply(client=client), 7, SPEC)


def test_an_evaluate_reply_needs_its_held_out_loss():
    ok = through_flower(
        message(
            {"metrics": MetricRecord({"num-examples": 64, "heldout-loss": 2.5}), "client": ConfigRecord({"name": "f"})}
        )
    )
    assert parse_evaluate(ok, 3, 10_000) == EvalReply(3, "f", 64, 2.5)
    bad = through_flower(
        message({"metrics": MetricRecord({"num-examples": 64}), "client": ConfigRecord({"name": "f"})})
    )
    with pytest.raises(ReplyError, match="lack 'heldout-loss'"):
        parse_evaluate(bad, 3, 10_000)


def test_a_refusal_is_parsed_and_its_reason_bounded():
    msg = message(
        {
            "metrics": MetricRecord({"refused-release": 1}),
            "client": ConfigRecord({"name": "f", "refused-release": "x" * 5000}),
        }
    )
    refusal = parse_train(through_flower(msg), 3, SPEC)
    assert isinstance(refusal, Refusal) and len(refusal.reason) == 1000
    forged = "no\nINFO : round 3: aggregated 9 devices"  # a second log line, forged by a device
    client = ConfigRecord({"refused-release": forged})
    msg = message({"metrics": MetricRecord({"refused-release": 1}), "client": client})
    assert parse_train(through_flower(msg), 3, SPEC).reason == "no\\nINFO : round 3: aggregated 9 devices"


def _q8_record() -> dict:
    return dict(pack({k: torch.zeros_like(v) for k, v in GLOBAL.items()}, "q8").items())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        # the .npy bytes say int16 (4, 64) while the declared metadata says int8 (4, 64): same byte count
        (
            lambda r: r.__setitem__("m.lora_A.weight", _lying(np.zeros((4, 64), np.int8), np.zeros((2, 64), np.int16))),
            "bytes hold int16",
        ),
        (
            lambda r: r.__setitem__("m.lora_A.weight" + SCALE_SUFFIX, Array(np.array(1.0, dtype=np.float16))),
            "expected float16 \\(4,\\)",
        ),
        (
            lambda r: r.__setitem__("m.lora_A.weight" + SCALE_SUFFIX, Array(np.zeros((4, 1), np.float16))),
            "expected float16 \\(4,\\)",
        ),
        (
            lambda r: r.__setitem__("m.lora_A.weight", _lying(np.zeros((4, 64), np.int8), None)),
            "not a valid .npy array",
        ),
    ],
)
def test_q8_payloads_whose_bytes_disagree_with_their_metadata_are_refused(mutate, reason):
    spec = UpdateSpec(GLOBAL, "q8", 10_000)
    record = _q8_record()
    mutate(record)
    reply = parse_train(train_reply(arrays=ArrayRecord(record)), 7, spec)
    with pytest.raises(ValueError, match=reason):
        decode_update(reply, spec)


def test_empty_fp16_data_is_refused():
    record = dict(pack({k: torch.zeros_like(v) for k, v in GLOBAL.items()}).items())
    record["m.lora_A.weight"] = _lying(np.zeros((4, 64), np.float16), None)
    reply = parse_train(train_reply(arrays=ArrayRecord(record)), 7, SPEC)
    with pytest.raises(ValueError, match="not a valid .npy array"):
        decode_update(reply, SPEC)


def _lying(declared: np.ndarray, actual: np.ndarray | None) -> Array:
    """An Array whose declared dtype/shape are ``declared``'s but whose bytes are ``actual``'s (None: empty)."""
    honest = Array(declared)
    data = b"" if actual is None else Array(actual).data
    return Array(dtype=honest.dtype, shape=tuple(honest.shape), stype=honest.stype, data=data)


# ---------------------------------------------------------------- fuzz
_scalars = st.one_of(
    st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
_metric_keys = st.sampled_from([*TRAIN, "base-download-bytes", "heldout-loss", "refused-release", "x"])
_config_values = st.one_of(
    st.text(max_size=200), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.binary(max_size=50), st.booleans()
)
_arrays = st.builds(
    lambda dtype, shape, junk: Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=junk),
    st.sampled_from(["float16", "int8", "uint8", "float32", "int16", "object"]),
    st.lists(st.integers(min_value=0, max_value=300), max_size=3),
    st.binary(max_size=600),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metrics=st.dictionaries(_metric_keys, _scalars, max_size=6),
    client=st.dictionaries(st.sampled_from(["name", "refused-release", "role"]), _config_values, max_size=3),
    arrays=st.dictionaries(st.sampled_from([*GLOBAL, "m.lora_A.weight#scale", "junk"]), _arrays, max_size=4),
    encoding=st.sampled_from(["fp16", "q8", "q4"]),
    extra=st.booleans(),
)
def test_fuzz_any_reply_is_parsed_or_cleanly_rejected(metrics, client, arrays, encoding, extra):
    records = {"metrics": MetricRecord(metrics), "client": ConfigRecord(client), "arrays": ArrayRecord(arrays)}
    if extra:
        records["more"] = MetricRecord({"a": 1})
    try:
        msg = through_flower(message(records))
    except (ValueError, TypeError, OverflowError):
        return  # Flower's own encoding refused it: it never reaches the coordinator
    spec = UpdateSpec(GLOBAL, encoding, 10_000)
    for parse in (lambda m: parse_train(m, 7, spec), lambda m: parse_evaluate(m, 7, 10_000)):
        try:
            reply = parse(msg)
        except ReplyError:
            continue
        if isinstance(reply, TrainReply):
            assert 1 <= reply.num_examples <= 10_000
            assert reply.train_loss is None or math.isfinite(reply.train_loss)  # optional: record DP withholds it
            try:
                delta = decode_update(reply, spec)
            except ValueError:  # WireError and RejectedUpdateError are ValueErrors with a reason
                continue
            assert all(torch.isfinite(t).all() for t in delta.values())
        elif isinstance(reply, EvalReply):
            assert math.isfinite(reply.heldout_loss)
