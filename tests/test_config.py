"""Config loading: typos, types, overrides, round trip."""

from __future__ import annotations

import pytest

from megalm.config import ConfigError, load_config, save_config

ROOT_CONFIG = "configs/tiny.yaml"


def test_tiny_config_loads_with_overrides():
    cfg = load_config(ROOT_CONFIG, ["training.max_steps=7", "optim.lr=3e-4", "model.family=gpt2"])
    assert cfg.training.max_steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.family == "gpt2"
    assert cfg.model.n_layers == 4  # from the file


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.max_step=3", "unknown config key 'training.max_step'; did you mean 'training.max_steps'?"),
        ("modle.n_layers=3", "did you mean 'model.n_layers'?"),
        ("model.n_layers=abc", "config key 'model.n_layers' expects int, got 'abc'"),
        ("zero.stage=4", "config key 'zero.stage' expects 0 | 1 | 2 | 3, got 4"),
        ("model.family=bert", "expects 'llama' | 'gpt2'"),
        ("training.max_steps", "is not of the form key.sub=value"),
    ],
)
def test_bad_override_names_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(ROOT_CONFIG, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_typo_in_yaml_file_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  global_bacth: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'training.global_batch'"):
        load_config(bad)


def test_section_given_a_scalar_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="'model' is a section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_int_accepted_for_float_but_bool_not_for_int():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["training.max_steps=true"])


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(ROOT_CONFIG, ["model.tie_embeddings=true", "optim.lr=5e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
