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
        ("train.steps", 0, r"'train\.steps' = 0 must be in \[1, 100000\]"),
        ("train.steps", 10**12, r"'train\.steps' = 1000000000000 must be in \[1, 100000\]"),  # years of a device's CPU
        ("topics", "../../elsewhere", r"'topics' = '\.\./\.\./elsewhere' must be plain folder names"),  # paths from it
        ("train.steps", "ten", r"'train\.steps' must be an integer"),
        ("lora.rank", 2.5, r"'lora\.rank' must be an integer"),
        ("lora.rank", 8192, r"'lora\.rank' = 8192 must be in \[1, 4096\]"),
        ("lora.alpha", 9000, r"'lora\.alpha' = 9000 must be > 0 and at most 1000 x lora\.rank"),  # rank 8: scale 1125
        ("train.lr", 3, r"'train\.lr' = 3\.0 must be in \(0, 1\)"),
        ("aggregation.method", "median", r"'aggregation\.method' = 'median' must be one of"),
        ("train.dtype", "fp8", r"'train\.dtype' = 'fp8' must be one of"),
        ("aggregation.delta-encoding", "q2", r"'aggregation\.delta-encoding' = 'q2' must be one of"),
        ("aggregation.max-norm-ratio", 1, r"'aggregation\.max-norm-ratio' = 1\.0 must be > 1"),
        ("aggregation.min-accepted", 0, r"'aggregation\.min-accepted' = 0 must be >= 1"),
        ("state.db", "outputs/", r"'state\.db' = 'outputs/' must name a file"),
        ("base.onnx", 2, r"'base\.onnx' = 2 must be 0 or 1"),
        ("round-timeout", float("inf"), r"'round-timeout' = inf must be in \(0, 604800\] seconds"),  # never given up
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
        ({"dp.noise-multiplier": -1.0}, r"'dp\.noise-multiplier' = -1\.0 must be 0 \(off\) or in \[0\.1, 1000\]"),
        ({"dp.clip-norm": 0.0}, r"'dp\.clip-norm' = 0\.0 must be > 0"),
        ({"dp.clipping": "device"}, r"'dp\.clipping' = 'device' must be one of"),
        ({"dp.delta": 1.0}, r"'dp\.delta' = 1\.0 must be in \(0, 1\)"),
        ({"dp.noise-multiplier": 1.0, "dp.population": 1000, "dp.delta": 0.01}, r"must be < 1 / dp\.population"),
    ],
)
def test_bad_privacy_settings_are_refused_with_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        FleetConfig.from_run_config({**app_defaults(), "aggregation.method": "fedavg", **values})


def test_record_level_dp_takes_any_method_but_a_fixed_noise_and_no_checkpointing():
    record = {**app_defaults(), "dp.level": "record", "dp.noise-multiplier": 1.0}
    assert FleetConfig.from_run_config(record).aggregation.method == "ties"
    with pytest.raises(ConfigError, match=r"'dp\.epsilon' = 4\.0 is not solved per device"):
        FleetConfig.from_run_config({**app_defaults(), "dp.level": "record", "dp.epsilon": 4.0})
    with pytest.raises(ConfigError, match=r"'train\.gradient-checkpointing' = 1 must be 0 with dp\.level = record"):
        FleetConfig.from_run_config({**record, "train.gradient-checkpointing": 1})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"aggregation.method": "ties"}, r"'aggregation\.method' = 'ties' cannot run under secure aggregation"),
        ({"aggregation.method": "exact"}, r"'aggregation\.method' = 'exact' cannot run under secure aggregation"),
        ({"aggregation.delta-encoding": "q8"}, r"'aggregation\.delta-encoding' = 'q8' must be fp16 under secure"),
        ({"dp.noise-multiplier": 1.0}, r"'dp\.clipping' = 'server' must be client under secure aggregation"),
        ({"aggregation.secure-clip-range": 0.0}, r"'aggregation\.secure-clip-range' = 0\.0 must be > 0"),
        ({"aggregation.secure": 1}, r"'aggregation\.secure' must be true or false"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_honour(values, message):
    run = {**app_defaults(), "aggregation.method": "ffa", "aggregation.secure": True, **values}
    with pytest.raises(ConfigError, match=message):
        FleetConfig.from_run_config(run)


def test_secure_aggregation_takes_its_range_from_the_dp_clip_norm():
    run = {**app_defaults(), "aggregation.method": "fedavg", "aggregation.secure": True, "dp.noise-multiplier": 1.0}
    cfg = FleetConfig.from_run_config({**run, "dp.clipping": "client", "dp.clip-norm": 0.3})
    assert cfg.secure_clip_range == 0.3
