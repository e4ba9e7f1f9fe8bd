import pytest

from shared.config import ConfigError, FleetConfig
from simulations.demo import app_defaults


def test_pyproject_defaults_validate_and_match_documented_fields():
    cfg = FleetConfig.from_run_config(app_defaults())
    assert cfg.model == "smollm2-135m-instruct"
    assert len(cfg.topics) >= 4 and cfg.min_clients >= 4 and cfg.num_server_rounds >= 3
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown run-config key 'train\.stepz'.*did you mean 'train\.steps'"):
        FleetConfig.from_run_config({**app_defaults(), "train.stepz": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.steps", 0, r"'train\.steps' = 0 must be >= 1"),
        ("train.steps", "ten", r"'train\.steps' must be an integer"),
        ("lora.rank", 2.5, r"'lora\.rank' must be an integer"),
        ("train.lr", 3, r"'train\.lr' = 3\.0 must be in \(0, 1\)"),
        ("aggregation.method", "median", r"'aggregation\.method' = 'median' must be one of"),
        ("train.dtype", "fp8", r"'train\.dtype' = 'fp8' must be one of"),
        ("aggregation.delta-encoding", "q2", r"'aggregation\.delta-encoding' = 'q2' must be one of"),
        ("aggregation.max-norm-ratio", 1, r"'aggregation\.max-norm-ratio' = 1\.0 must be > 1"),
        ("aggregation.min-accepted", 0, r"'aggregation\.min-accepted' = 0 must be >= 1"),
        ("state.db", "outputs/", r"'state\.db' = 'outputs/' must name a file"),
    ],
)
def test_bad_values_are_refused_with_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        FleetConfig.from_run_config({**app_defaults(), key: value})


def test_comma_separated_lists_are_parsed():
    cfg = FleetConfig.from_run_config({"topics": "a, b ,c", "lora.target-modules": "q_proj,v_proj"})
    assert cfg.topics == ("a", "b", "c")
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("method", ["ties", "exact"])
def test_differential_privacy_with_a_nonlinear_aggregation_is_refused_with_the_reason(method):
    run = {**app_defaults(), "aggregation.method": method, "dp.noise-multiplier": 1.0}
    with pytest.raises(
        ConfigError,
        match=rf"'aggregation\.method' = '{method}' cannot run with differential privacy.*"
        r"not a sum of clipped updates.*\('fedavg', 'ffa'\)",
    ):
        FleetConfig.from_run_config(run)


@pytest.mark.parametrize("method", ["fedavg", "ffa"])
def test_differential_privacy_runs_with_fedavg_and_ffa(method):
    cfg = FleetConfig.from_run_config({**app_defaults(), "aggregation.method": method, "dp.epsilon": 4.0})
    assert cfg.dp.enabled and cfg.dp.clipping == "server"
    assert not FleetConfig.from_run_config(app_defaults()).dp.enabled  # off by default


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp.noise-multiplier": 1.0, "dp.epsilon": 2.0}, r"exclusive"),
        ({"dp.noise-multiplier": -1.0}, r"'dp\.noise-multiplier' = -1\.0 must be >= 0"),
        ({"dp.clip-norm": 0.0}, r"'dp\.clip-norm' = 0\.0 must be > 0"),
        ({"dp.clipping": "device"}, r"'dp\.clipping' = 'device' must be one of"),
        ({"dp.delta": 1.0}, r"'dp\.delta' = 1\.0 must be in \(0, 1\)"),
        ({"dp.noise-multiplier": 1.0, "dp.population": 1000, "dp.delta": 0.01}, r"must be < 1 / dp\.population"),
    ],
)
def test_bad_privacy_settings_are_refused_with_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        FleetConfig.from_run_config({**app_defaults(), "aggregation.method": "fedavg", **values})
