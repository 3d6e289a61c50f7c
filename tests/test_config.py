"""Config: presets, YAML, dotted overrides, and errors that name the field and the allowed values."""
import pytest

from fasttips import config
from fasttips.config import ConfigError


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_every_preset_loads_and_validates(name):
    cfg = config.load(overrides=[f"preset={name}"])
    assert cfg.preset == name
    assert cfg.vision.width % cfg.vision.heads == 0


def test_vit_g_preset_matches_the_paper_shape():
    v = config.preset("vit-g").vision
    assert (v.width, v.depth, v.heads, v.mlp_hidden, v.ffn) == (1536, 40, 24, 4096, "swiglu")
    assert v.width // v.heads == 64


def test_overrides_are_typed():
    cfg = config.load(overrides=["train.steps=7", "loss.student_temp=0.2", "heads.shared=true",
                                 "data.global_scale=0.4,1.0"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.loss.student_temp == 0.2
    assert cfg.heads.shared is True
    assert cfg.data.global_scale == (0.4, 1.0)


@pytest.mark.parametrize("override, expected", [
    ("loss.centering=foo", "loss.centering: 'foo' is not allowed; choose one of ['softmax', 'sinkhorn_knopp']"),
    ("loss.bogus=1", "loss.bogus: unknown field 'bogus'"),
    ("nosuch.field=1", "unknown section 'nosuch'"),
    ("train.steps=ten", "train.steps: expected a int"),
    ("train.steps=1.5", "train.steps: expected an int"),
    ("preset=vit-x", "preset: 'vit-x' is not a preset; choose one of"),
    ("data.global_size=100", "data.global_size: 100 is not a multiple of vision.patch_size=14"),
    ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("train.steps", "expected key=value"),
    ("data.source=shards", "data.path: required when data.source=shards"),
    ("loss.init_logit_scale=5", "loss.init_logit_scale: 5.0 is above ln(loss.max_logit_scale) = 4.6052"),
    ("loss.max_logit_scale=0", "loss.max_logit_scale: must be > 0"),
])
def test_bad_config_names_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    assert expected in str(err.value)


def test_yaml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: vit-s\ntrain:\n  steps: 3\nloss:\n  ibot_tokens: masked\n")
    cfg = config.load(path, overrides=["train.steps=4"])
    assert cfg.preset == "vit-s" and cfg.vision.width == 384
    assert cfg.train.steps == 4 and cfg.loss.ibot_tokens == "masked"
    saved = tmp_path / "resolved.yaml"
    config.save(cfg, saved)
    again = config.load(saved)
    assert config.to_dict(again) == config.to_dict(cfg)


def test_yaml_errors_name_the_file_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz: unknown field 'stepz'"):
        config.load(bad)


def test_describe_lists_every_field():
    text = config.describe()
    assert "loss.centering (softmax|sinkhorn_knopp) = 'softmax'" in text
    assert "train.steps (int)" in text
