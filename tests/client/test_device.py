"""A device's trust list and its base verification come from its own settings, never from a run config."""

import pytest

from client.device import (
    FLOAT_BASE_ENV,
    TRUST_ENV,
    DeviceConfigError,
    check_base_format,
    state_file,
    trust_file,
)


@pytest.fixture
def device_env(tmp_path, monkeypatch):
    """A device with an empty cache and no device-side environment."""
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(FLOAT_BASE_ENV, raising=False)
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
