"""Config: presets, YAML, dotted overrides, declared ranges, and errors that name the field."""
import math
import subprocess
import sys
import warnings
from dataclasses import fields

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
    # issue 14.8: each of these used to divide by zero, crash after a step, or pass silently
    ("vision.heads=0", "vision.heads: must be >= 1, got 0"),
    ("vision.patch_size=0", "vision.patch_size: must be >= 1, got 0"),
    ("train.ckpt_every=0", "train.ckpt_every: must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("loss.teacher_temp=0", "loss.teacher_temp: must be > 0, got 0.0"),
    ("teacher.momentum=2", "teacher.momentum: must be in [0, 1], got 2.0"),
    ("vision.width=-128", "vision.width: must be >= 1, got -128"),
    ("data.global_size=-112", "data.global_size: must be >= 1"),
    ("heads.hidden=-1", "heads.hidden: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("data.global_scale=1.0,0.32", "data.global_scale: expected (low, high) with low <= high, got (1.0, 0.32)"),
    ("data.global_scale=", "data.global_scale: expected 2 comma-separated values"),
    ("data.global_scale=0,0.5", "data.global_scale: each value must be in (0, 1], got (0.0, 0.5)"),
    ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite number"),
    ("vision.drop_path=1.5", "vision.drop_path: must be in [0, 1), got 1.5"),
    ("optim.clip_grad=-1", "optim.clip_grad: must be >= 0, got -1.0"),
    ("vision.ln_eps=-1", "vision.ln_eps: must be > 0, got -1.0"),
    ("train.max_nonfinite=0", "train.max_nonfinite: must be >= 1, got 0"),
    ("eval.every=-1", "eval.every: must be >= 0, got -1"),
    ("optim.betas=0.9,1.0", "optim.betas: each value must be in [0, 1), got (0.9, 1.0)"),
    ("train.run_dir=", "train.run_dir: must not be empty"),
    ("train.steps=[", "train.steps: expected a int, got '['"),
])
def test_bad_config_names_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_every_numeric_field_declares_its_range_and_rejects_a_value_outside_it():
    """Generic: for each field with a declared bound, a value just past it is refused by name."""
    cfg = config.Config()
    checked = 0
    for key in config.keys():
        section, name = key.split(".")
        f = next(f for f in fields(getattr(cfg, section)) if f.name == name)
        meta = f.metadata
        assert meta["help"].strip(), f"{key} has no help text"
        bad = (meta["ge"] - 1 if meta["ge"] is not None else meta["gt"] if meta["gt"] is not None
               else meta["le"] + 1 if meta["le"] is not None else meta["lt"] if meta["lt"] is not None else None)
        if bad is None:
            continue
        value = getattr(cfg, section).__dict__[name]
        value = f"{bad},{bad}" if isinstance(value, tuple) else bad
        with pytest.raises(ConfigError, match=f"^{key}: "):
            config.load(overrides=[f"{key}={value}"])
        checked += 1
    assert checked >= 40


def test_validate_changes_nothing():
    """full_ema with the default teacher.features: accepted as written (the EMA backbone makes its own
    features; the field applies to head_ema only), not silently rewritten."""
    cfg = config.load(overrides=["teacher.mode=full_ema"])
    before = config.to_dict(cfg)
    config.validate(cfg)
    assert config.to_dict(cfg) == before and cfg.teacher.features == "detached"


def test_n_cls_is_not_a_setting_but_old_configs_still_load(tmp_path):
    assert "vision.n_cls" not in config.keys() and "n_cls" not in config.describe()
    assert config.Config().vision.n_cls == 2                      # still readable by the model code
    old = tmp_path / "old.yaml"
    old.write_text("preset: tiny\nvision:\n  n_cls: 2\ntrain:\n  steps: 3\n")
    with pytest.warns(UserWarning, match="vision.n_cls: is no longer a setting"):
        cfg = config.load(old)
    assert cfg.train.steps == 3
    with pytest.warns(UserWarning):
        assert config.from_dict({"preset": "tiny", "vision": {"n_cls": 2}}).vision.n_cls == 2
    with pytest.raises(ConfigError, match="vision.n_cls: is no longer a setting"):
        config.load(overrides=["vision.n_cls=3"])


def test_train_compile_is_a_choice_and_old_booleans_still_load(tmp_path):
    """train.compile was a bool (true = compile each block): off|blocks|step now; a saved true/false (and
    YAML's bare on/off, which it reads as booleans) keep their meaning; anything else is named."""
    assert config.COMPILE_MODES == ("off", "blocks", "step") and config.Config().train.compile == "off"
    for value, mode in (("true", "blocks"), ("false", "off"), ("on", "blocks"), ("off", "off"),
                        ("blocks", "blocks"), ("step", "step")):
        # (check_machine=False: under torch 2.11 this machine refuses step, test_compile_modes.py)
        assert config.load(overrides=[f"train.compile={value}"], check_machine=False).train.compile == mode, value
    old = tmp_path / "old.yaml"
    old.write_text("preset: tiny\ntrain:\n  compile: true\n")
    cfg = config.load(old)
    assert cfg.train.compile == "blocks"
    assert config.from_dict(config.to_dict(cfg)).train.compile == "blocks"      # saved as the word now
    with pytest.raises(ConfigError, match=r"train.compile: 'model' is not allowed; choose one of "
                                          r"\['off', 'blocks', 'step'\]"):
        config.load(overrides=["train.compile=model"])
    with pytest.raises(ConfigError, match="train.compile: 2 is not allowed"):
        config.load(overrides=["train.compile=2"])


def test_literal_tuples_are_the_one_source_of_allowed_values():
    from fasttips.data import augment
    from fasttips.kernels.dino_loss import common
    from fasttips.losses import ibot
    from fasttips import teacher
    assert augment.PIXEL_NORMS is config.PIXEL_NORMS
    assert common.CENTERINGS is config.CENTERINGS
    assert ibot.TOKENS is config.IBOT_TOKENS
    assert (teacher.MODES, teacher.FEATURES) == (config.TEACHER_MODES, config.TEACHER_FEATURES)
    assert "sinkhorn_knopp" in config.CENTERINGS


def test_yaml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: vit-s\ntrain:\n  steps: 3\nloss:\n  ibot_tokens: masked\n")
    cfg = config.load(path, overrides=["train.steps=4"])
    assert cfg.preset == "vit-s" and cfg.vision.width == 384
    assert cfg.train.steps == 4 and cfg.loss.ibot_tokens == "masked"
    saved = tmp_path / "resolved.yaml"
    config.save(cfg, saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # a fresh save holds no retired key
        again = config.load(saved)
    assert config.to_dict(again) == config.to_dict(cfg)


@pytest.mark.parametrize("text, expected", [
    ("train:\n  stepz: 3\n", "train.stepz: unknown field 'stepz'"),
    ("train: [1, 2\n", "is not valid YAML"),
    ("just a sentence\n", "must hold a mapping of sections"),
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("train:\n  run_dir: [a, b]\n", "train.run_dir: expected a string"),
])
def test_yaml_errors_name_the_file_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_the_machine_checks_are_config_errors(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^train.device: cuda, but torch sees no CUDA device"):
        config.load(overrides=["train.device=cuda"])
    monkeypatch.setattr(config, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match="^data.loader: dali, but nvidia.dali is not installed"):
        config.load(overrides=["data.loader=dali"])
    config.load(overrides=["data.loader=dali", "data.source=synthetic"])   # synthetic data needs no loader
    a_file = tmp_path / "run"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="^train.run_dir: .* is a file, not a folder"):
        config.load(overrides=[f"train.run_dir={a_file}"])
    # a saved config read back for evaluation is not checked against this machine
    saved = config.to_dict(config.load(overrides=["data.source=synthetic"]))
    saved["train"]["device"] = "cuda"
    assert config.from_dict(saved).train.device == "cuda"


def test_describe_gives_type_range_default_and_help_for_every_field():
    text = config.describe()
    assert "  loss.centering (softmax|sinkhorn_knopp) = 'softmax'\n" in text
    assert "  vision.drop_path (float, in [0, 1)) = 0.0\n      stochastic-depth probability" in text
    assert "  data.global_scale (float,float, each in (0, 1], low <= high) = (0.32, 1.0)" in text
    assert "  train.steps (int, >= 1) = 100" in text
    help_lines: dict[str, list[str]] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("      "):
            assert len(line) <= 100, line
            help_lines[key].append(line.strip())
        else:
            key = line.split(" (")[0].strip()
            help_lines[key] = []
    assert list(help_lines) == config.keys()
    assert all(help_lines.values()), [k for k, v in help_lines.items() if not v]


def test_range_text():
    assert config.range_text({"ge": 1}) == ">= 1"
    assert config.range_text({"gt": 0, "le": 1}) == "in (0, 1]"
    assert config.range_text({"ge": 0, "lt": 1}) == "in [0, 1)"
    assert config.range_text({}) == ""
    assert math.isclose(config.load().optim.betas[1], 0.999)


# ----------------------------------------------------------------------------------------------
# `fasttips train` with a bad config: exit 2, one line naming the field, before any work
# ----------------------------------------------------------------------------------------------
BAD_TRAIN_ARGS = [
    (["vision.heads=0"], "vision.heads"),
    (["vision.patch_size=0"], "vision.patch_size"),
    (["train.ckpt_every=0"], "train.ckpt_every"),
    (["train.log_every=0"], "train.log_every"),
    (["loss.teacher_temp=0"], "loss.teacher_temp"),
    (["teacher.momentum=2"], "teacher.momentum"),
    (["vision.width=-64"], "vision.width"),
    (["data.local_size=-56"], "data.local_size"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.global_scale=1.0,0.5"], "data.global_scale"),
    (["data.global_scale="], "data.global_scale"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["vision.drop_path=1.5"], "vision.drop_path"),
    (["optim.clip_grad=-1"], "optim.clip_grad"),
    (["vision.ln_eps=-1"], "vision.ln_eps"),
    (["train.max_nonfinite=0"], "train.max_nonfinite"),
    (["eval.every=-1"], "eval.every"),
    (["train.device=cuda"], "train.device"),
    (["data.loader=dali"], "data.loader"),
    (["train.run_dir=FILE"], "train.run_dir"),
    (["train.activation_checkpointing=sometimes"], "train.activation_checkpointing"),
    (["train.ac_every=0"], "train.ac_every"),
    (["train.activation_checkpointing=every_k", "train.ac_every=3"], "train.ac_every"),
    (["--config", "NOT_YAML"], "--config"),
]


@pytest.mark.parametrize("args, field_name", BAD_TRAIN_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGS])
def test_fasttips_train_rejects_a_bad_value_in_one_line(tmp_path, monkeypatch, capsys, args, field_name):
    import torch
    from fasttips import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "_installed", lambda module: False)
    monkeypatch.chdir(tmp_path)                                  # nothing may be written here
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "NOT_YAML").write_bytes(b"train: {steps: [1\n\x00")
    monkeypatch.setattr(train, "Trainer", lambda *a, **k: pytest.fail("work started with a bad config"))
    code = train.main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fasttips train: config error: ") and field_name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "NOT_YAML"]


def test_a_bad_value_through_the_fasttips_command(tmp_path):
    """The one subprocess: the installed entry point, exit code and stderr as a user sees them."""
    done = subprocess.run([sys.executable, "-m", "fasttips.cli", "train", "vision.heads=0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "fasttips train: config error: vision.heads: must be >= 1, got 0"
    assert list(tmp_path.iterdir()) == []
