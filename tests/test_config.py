"""``common.config``: run-config values are coerced to their field's type (enums included),
bad values are rejected with a message naming what is allowed, and ``alacarte config``
documents every key with its default."""

from __future__ import annotations

import pytest

from common import config as config_module
from common.config import AppConfig, ConfigError, Mode, coerce_value
from common.data import Partitioner


def test_modes_and_partitioners_are_coerced_to_their_enums():
    config = AppConfig.from_run_config({"mode": "fedavg", "partitioner": "classes"})
    assert config.mode is Mode.FEDAVG and config.partitioner is Partitioner.CLASSES
    assert config.mode == "fedavg" and f"{config.partitioner}" == "classes"  # still plain strings to callers
    assert AppConfig(mode="fedavg").mode is Mode.FEDAVG  # direct construction too


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("mode", "average", "'alacarte', 'fedavg'"),
    ("partitioner", "shards", "'iid', 'dirichlet', 'classes'"),
])
def test_unknown_choice_is_rejected_with_the_allowed_values(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config({key: value})
    assert str(err.value) == f"run-config {key} must be one of {allowed}, got {value!r}"


@pytest.mark.parametrize(("kind", "value", "expected"), [
    (bool, "true", True), (bool, "FALSE", False), (bool, "1", True), (bool, 0, False), (bool, True, True),
    (int, "3", 3), (int, 4.0, 4), (float, "1e-3", 1e-3), (float, 2, 2.0), (str, "x", "x"),
    (Mode, "fedavg", Mode.FEDAVG), (Partitioner, Partitioner.IID, Partitioner.IID),
])
def test_good_values_are_coerced(kind, value, expected):
    result = coerce_value("key", value, kind)
    assert result == expected and type(result) is kind


@pytest.mark.parametrize(("kind", "value", "expected"), [
    (bool, "maybe", "a bool (true, false, 1 or 0)"), (bool, "yes!", "a bool"), (bool, 2, "a bool"),
    (int, "many", "an integer"), (int, 2.5, "an integer"), (int, True, "an integer"), (float, "fast", "a number"),
    (Mode, "average", "one of 'alacarte', 'fedavg'"),
])
def test_bad_values_are_rejected_with_what_was_expected(kind, value, expected):
    with pytest.raises(ConfigError, match="^key must be " + expected.replace("(", r"\(").replace(")", r"\)")):
        coerce_value("key", value, kind)


def test_bad_boolean_in_the_run_config_is_not_taken_for_false():
    with pytest.raises(ConfigError, match="run-config probe-init must be a bool"):
        AppConfig.from_run_config({"probe-init": "maybe"})
    assert AppConfig.from_run_config({"probe-init": "false", "kv-cache": "0"}).probe_init is False


def test_help_shows_enum_defaults_and_choices_as_plain_values(capsys):
    texts = AppConfig.help()
    assert texts["mode"].endswith("(default 'alacarte')") and "alacarte, fedavg" in texts["mode"]
    assert texts["partitioner"].endswith("(default 'dirichlet')") and "iid, dirichlet, classes" in texts["partitioner"]
    assert config_module.run(None) == 0
    printed = capsys.readouterr().out
    assert "Mode." not in printed and "Partitioner." not in printed
    assert all(key in printed for key in texts)


def test_recipe_keys_reach_the_training_config():
    config = AppConfig.from_run_config({"head-lr-scale": "0.1", "learning-rate": "0.02", "selection-level": "0.2"})
    plan = config.train_config()
    assert (plan.head_lr_scale, plan.lr, plan.selection_level) == (0.1, 0.02, 0.2)
    for bad in ("0", "-0.5", "nan"):
        with pytest.raises(ConfigError, match="head-lr-scale"):
            AppConfig.from_run_config({"head-lr-scale": bad})
    for bad in ("0", "1", "1.5", "nan"):
        with pytest.raises(ConfigError, match="selection-level must be in"):
            AppConfig.from_run_config({"selection-level": bad})
    assert AppConfig.from_run_config({"fedavg-patience": "2"}).fedavg_patience == 2
    with pytest.raises(ConfigError, match="fedavg-patience must be >= 0"):
        AppConfig.from_run_config({"fedavg-patience": "-1"})


@pytest.mark.parametrize(("key", "least"), [
    ("num-server-rounds", 1), ("local-epochs", 1), ("img-size", 1), ("batch-size", 1), ("n-prompt", 1),
    ("n-memory", 0), ("examples-per-source", 0), ("test-examples", 0), ("min-steps", 0), ("fedavg-patience", 0),
])
def test_a_count_below_its_bound_is_refused_by_name(key, least):
    assert getattr(AppConfig.from_run_config({key: least}), key.replace("-", "_")) == least
    with pytest.raises(ConfigError, match=f"^run-config {key} must be >= {least}, got {least - 1}$"):
        AppConfig.from_run_config({key: least - 1})
