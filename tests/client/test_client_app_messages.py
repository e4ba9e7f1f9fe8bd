"""A hostile coordinator's malformed round message or run config: the device refuses the round, naming why.

Never an exception: Flower would send its raw text (paths of this device included) back, and the
device's reply would say nothing of what was wrong (``client_app.REFUSALS``, ``public_reason``).
"""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from shared.release_records import release_to_records
from tests.client import test_client_app
from tests.client.test_client_app import _deliver, _release, _run_config

fleet = test_client_app.fleet  # the fixture: an honest and an attacker's key, an empty device cache


def _call(fleet, content, run_config, handler="train"):
    """Send ``content`` to the ClientApp's ``handler`` (a device trusting the honest key); return its refusal."""
    node = {"allow-float-base": True, "trust-file": str(fleet / "honest.key.pub")}
    return _deliver(fleet, content, run_config, node, handler)[0]


def _npy_header(length):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


@pytest.fixture
def signed(fleet, tiny_model_dir):
    arrays, config = release_to_records(_release(fleet, tiny_model_dir, "honest"))
    return arrays, config, _run_config(fleet, tiny_model_dir)


def test_an_honest_message_is_served(fleet, signed):
    arrays, config, run = signed
    assert _call(fleet, {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}, run) is None


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("no config record", "carries no 'config' record"),
        ("no server-round", "server-round None, expected an integer"),
        ("server-round as text", "server-round '1', expected an integer"),
        ("no arrays record", "carries no release files"),
        ("a .npy header claiming 1 TiB", "its .npy header says uint8 (1099511627776,)"),  # np.load tried to allocate
        ("an array of another type", "expected a numpy uint8 byte array"),
    ],
)
@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_a_malformed_message_is_refused_by_name(fleet, signed, case, why, handler):
    arrays, config, run = signed
    content = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}
    if case == "no config record":
        del content["config"]
    elif case == "no server-round":
        content["config"] = ConfigRecord(config)
    elif case == "server-round as text":
        content["config"] = ConfigRecord({"server-round": "1", **config})
    elif case == "no arrays record":
        del content["arrays"]
    elif case == "a .npy header claiming 1 TiB":
        huge = Array(dtype="uint8", shape=(1 << 40,), stype="numpy.ndarray", data=_npy_header(1 << 40))
        content["arrays"] = ArrayRecord({"adapter_model.safetensors": huge})
    else:
        content["arrays"] = ArrayRecord({"x": Array(dtype="uint8", shape=(4,), stype="torch.Tensor", data=b"abcd")})
    if handler == "evaluate":
        run = {**run, "train.max-seq-len": 256}  # 32 leaves no response token of the held-out examples to score
    refused = _call(fleet, content, run, handler)
    if handler == "evaluate" and "server-round" in case:
        assert refused is None  # evaluation reads no round number: the signed release decides what it scores
    else:
        assert refused is not None and why in refused, refused


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("no-such-key", 1, "unknown run-config key 'no-such-key'"),
        ("train.steps", 10**12, "'train.steps' = 1000000000000 must be in [1, 100000]"),
        ("lora.target-modules", "nope_proj", "nope_proj"),  # peft's own error, raised when the adapter is attached
        ("lora.rank", 4096, "lora rank 4096 is more than"),  # 5.9 GB on SmolLM2 before the release was even checked
    ],
)
def test_a_run_config_the_device_cannot_serve_is_refused_by_name(fleet, signed, key, value, why):
    arrays, config, run = signed
    refused = _call(
        fleet, {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}, {**run, key: value}
    )
    assert refused is not None and why in refused and str(fleet) not in refused, refused


def test_an_error_beyond_the_rounds_checks_is_refused_and_its_traceback_stays_in_the_devices_log(fleet, signed, caplog):
    arrays, config, run = signed
    content = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}
    with caplog.at_level("WARNING", logger="flwr"):
        refused = _call(fleet, content, {**run, "lora.target-modules": "nope_proj"})  # raised inside peft
    assert refused is not None and "nope_proj" in refused and "Traceback" not in refused
    logged = [r for r in caplog.records if "refused the release" in r.getMessage()]
    assert logged and logged[-1].exc_info is not None  # for whoever debugs the device: where it was raised
