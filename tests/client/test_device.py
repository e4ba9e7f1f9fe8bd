"""A device's trust list and its base verification come from its own settings, never from a run config."""

import pytest

from client.device import (
    ENROLMENT_DIR_ENV,
    FLOAT_BASE_ENV,
    TRUST_ENV,
    DeviceConfigError,
    PrivacyFloor,
    check_base_format,
    check_train_steps,
    privacy_floor,
    secagg_enrolment,
    state_file,
    trust_file,
)
from shared.enrolment import enrol_identity
from shared.sign import generate_key


@pytest.fixture
def device_env(tmp_path, monkeypatch):
    """A device with an empty cache and no device-side environment."""
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(FLOAT_BASE_ENV, raising=False)
    monkeypatch.delenv(ENROLMENT_DIR_ENV, raising=False)
    return monkeypatch


def test_the_trust_list_comes_from_the_node_config_then_the_environment_then_the_cache(tmp_path, device_env):
    with pytest.raises(DeviceConfigError, match="no trust list, so it refuses every release: .*node config trust-file"):
        trust_file({})
    default = tmp_path / "cache" / "trust.pub"
    default.parent.mkdir()
    default.write_text("")
    assert trust_file({}) == default
    device_env.setenv(TRUST_ENV, str(tmp_path / "env.pub"))
    assert trust_file({}) == tmp_path / "env.pub"
    assert trust_file({"trust-file": str(tmp_path / "node.pub")}) == tmp_path / "node.pub"


def test_a_float_base_needs_the_devices_own_opt_in(device_env):
    check_base_format("int4", {})
    with pytest.raises(DeviceConfigError, match="base.format=float .*allow-float-base=true or FLEETLORA_ALLOW_FLOAT"):
        check_base_format("float", {})
    check_base_format("float", {"allow-float-base": True})
    check_base_format("float", {"allow-float-base": "true"})
    with pytest.raises(DeviceConfigError, match="base.format=float"):
        check_base_format("float", {"allow-float-base": False})
    with pytest.raises(DeviceConfigError, match="allow-float-base = 'maybe' is not true or false"):
        check_base_format("float", {"allow-float-base": "maybe"})
    device_env.setenv(FLOAT_BASE_ENV, "1")
    check_base_format("float", {})
    with pytest.raises(DeviceConfigError):
        check_base_format("float", {"allow-float-base": "false"})  # the node config decides over the environment


def test_the_replay_store_is_per_device(tmp_path, device_env):
    assert state_file({}, "noun.animal") == tmp_path / "cache" / "devices" / "noun.animal" / "accepted.json"
    assert state_file({"state-dir": str(tmp_path / "s")}, "x") == tmp_path / "s" / "accepted.json"


def test_a_privacy_floor_comes_from_the_node_config_and_refuses_a_round_below_it():
    assert privacy_floor({}) == PrivacyFloor()  # none set: the run config decides, as before
    floor = privacy_floor({"require-record-dp": "true", "min-noise-multiplier": 0.8, "max-epsilon": 4})
    floor.check(record_dp=True, noise_multiplier=1.0, secure=False)
    with pytest.raises(DeviceConfigError, match="only under record-level DP"):
        floor.check(record_dp=False, noise_multiplier=0.0, secure=True)  # client-level noise is the coordinator's
    with pytest.raises(DeviceConfigError, match="noise-multiplier 0.05 is below this device's min-noise-multiplier"):
        floor.check(record_dp=True, noise_multiplier=0.05, secure=False)
    assert floor.epsilon_cap(None) == 4.0 and floor.epsilon_cap(8.0) == 4.0 and floor.epsilon_cap(2.0) == 2.0
    with pytest.raises(DeviceConfigError, match="only in secure rounds"):
        privacy_floor({"require-secure-aggregation": True}).check(record_dp=True, noise_multiplier=1.0, secure=False)
    for bad in ({"max-epsilon": 0}, {"min-noise-multiplier": float("inf")}, {"max-epsilon": "4"}):
        with pytest.raises(DeviceConfigError, match="is not a positive number"):
            privacy_floor(bad)


def test_a_device_refuses_a_round_asking_more_steps_than_its_own_ceiling():
    check_train_steps({}, 100_000)  # none set: the run decides (train.steps is at most 100,000)
    check_train_steps({"max-train-steps": 200}, 200)
    check_train_steps({"max-train-steps": "200"}, 30)  # as `flower-supernode --node-config` may pass it
    with pytest.raises(DeviceConfigError, match="the run asks 100,000 local steps a round, more than .* 200$"):
        check_train_steps({"max-train-steps": 200}, 100_000)
    for bad in (0, -1, True, 1.5, "ten", "1e3", 100_001, "9" * 40):
        with pytest.raises(DeviceConfigError, match=r"max-train-steps = .* must be an integer in \[1, 100,000\]"):
            check_train_steps({"max-train-steps": bad}, 1)


def test_a_secagg_enrolment_comes_from_the_node_config_else_the_devices_file_in_the_enrolment_folder(
    tmp_path, device_env
):
    authority = generate_key(tmp_path / "authority.key")
    folder = tmp_path / "enrolments"
    (folder / "trust.pub").parent.mkdir()
    (folder / "trust.pub").write_bytes((tmp_path / "authority.key.pub").read_bytes())
    sim = enrol_identity(authority, folder / "partition-3.key", folder / "partition-3.enrolment")
    named = enrol_identity(authority, folder / "site-7.key", folder / "site-7.enrolment")
    assert secagg_enrolment({"partition-id": 3}) == (None, None)  # no folder, no node config: unsigned keys
    device_env.setenv(ENROLMENT_DIR_ENV, str(folder))
    identity, trust = secagg_enrolment({"partition-id": 3})  # a simulation's virtual device 3
    assert identity is not None and identity.public == sim and trust is not None and len(trust.trusted) == 1
    identity, _ = secagg_enrolment({"name": "site-7"})  # a SuperNode named in its node config
    assert identity is not None and identity.public == named
    with pytest.raises(DeviceConfigError, match=f"does not load .{ENROLMENT_DIR_ENV}=.*partition-4.key"):
        secagg_enrolment({"partition-id": 4})
    for bad in ("../site-7", ".hidden", ""):
        with pytest.raises(DeviceConfigError, match="cannot name files"):
            secagg_enrolment({"name": bad})
    own = enrol_identity(authority, tmp_path / "own.key", tmp_path / "own.enrolment")
    config = {"secagg-identity-key": str(tmp_path / "own.key"), "secagg-enrolment": str(tmp_path / "own.enrolment"),
              "secagg-enrolment-trust": str(folder / "trust.pub"), "partition-id": 3}  # fmt: skip
    identity, _ = secagg_enrolment(config)  # the node config comes first
    assert identity is not None and identity.public == own
