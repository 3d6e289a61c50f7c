"""fasttips.interop without the external clients: export → import is bitwise for every format, the
CLI commands, warm starts (checked before anything is copied), frozen-backbone steps, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from interop_helpers import (CAPTIONS, images, save_run, tiny_cfg, tiny_model,
                             tokenizer)

from fasttips.data.tokenizer import Tokenizer
from fasttips.interop import (LayoutError, SourceError, backbone_parameters, check_tokenizer,
                              init_from, read_source, resolve_init_config)
from fasttips.interop import cli, formats, warmstart
from fasttips.models import build_model


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok):
    """A fasttips run of a tiny model (LayerScale on) and the model itself."""
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    root = tmp_path_factory.mktemp("run")
    save_run(root, cfg, model, tok)
    return root, cfg, model


@pytest.fixture(autouse=True)
def fresh_cache():
    warmstart._CACHE.clear()
    yield
    warmstart._CACHE.clear()


def tower_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith(("vision.", "text.")) or k == "logit_scale"}


def assert_bitwise(expected: dict, got: dict, skip=()):
    for key, value in expected.items():
        if key in skip:
            continue
        assert key in got, key
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("to", ["hf", "tips", "timm"])
def test_export_then_import_is_bitwise(run, tmp_path, to):
    root, cfg, model = run
    assert cli.main(["export", str(root), "--to", to, str(tmp_path / to)]) == 0
    src = tmp_path / to / "model.safetensors" if to == "timm" else tmp_path / to
    imported = read_source(src)
    expected = tower_state(model)
    if to == "timm":                      # vision only; timm has no mask token
        expected = {k: v for k, v in expected.items() if k.startswith("vision.") and k != "vision.mask_token"}
    assert_bitwise(expected, imported.state)
    assert imported.overrides["vision.pos_grid"] == cfg.vision.pos_grid
    assert imported.overrides["vision.mlp_hidden"] == cfg.vision.mlp_hidden


def test_hub_cache_folders_and_tips_prefixes_are_found(run, tmp_path):
    root, cfg, model = run
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    cli.export(root, "hf", snapshot)
    assert read_source(tmp_path / "models--org--tiny").path == snapshot
    cli.export(root, "tips", tmp_path / "rel")
    for src in (tmp_path / "rel" / "rel_text.npz", tmp_path / "rel" / "rel"):
        assert torch.equal(read_source(src).state["text.norm.bias"], model.text.norm.bias)


def test_tips_files_follow_the_release_layout(run, tmp_path):
    root, cfg, model = run
    written = cli.export(root, "tips", tmp_path / "mine")
    assert [p.name for p in written] == ["mine_vision.npz", "mine_text.npz", "tokenizer.model"]
    with np.load(written[0], allow_pickle=False) as v, np.load(written[1], allow_pickle=False) as t:
        G, D = cfg.vision.pos_grid, cfg.vision.width
        assert v["pos_embed"].shape == (1, 1 + G * G, D) and not v["pos_embed"][0, 0].any()
        assert v["register_tokens"].shape == (1, 1, D) and v["cls_token"].shape == (1, 1, D)
        assert v["patch_embed.proj.weight"].shape == (D, 3, 14, 14)
        assert "blocks.1.ls2.gamma" in v.files and "blocks.0.attn.qkv.weight" in v.files
        assert t["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * D, D)
        assert math.isclose(float(t["temperature_contrastive"]), math.exp(-5.3), rel_tol=1e-6)
        assert math.isclose(float(t["temperature"]), math.exp(-4.1), rel_tol=1e-6)


def test_swiglu_and_no_layerscale_towers_round_trip(tmp_path, tok):
    cfg = tiny_cfg(vision__ffn="swiglu", vision__mlp_hidden=96, vision__layerscale=0.0)
    model = tiny_model(cfg, seed=3)
    save_run(tmp_path / "run", cfg, model, tok)
    formats.write_hf(tmp_path / "hf", model.state_dict(), cfg, tok.serialized())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["use_swiglu_ffn"] is True
    imported = read_source(tmp_path / "hf")
    assert imported.overrides["vision.mlp_hidden"] == 96 and imported.overrides["vision.ffn"] == "swiglu"
    assert imported.overrides["vision.layerscale"] == 1.0          # gammas of 1: x·1 is x exactly
    assert torch.equal(imported.state["vision.blocks.0.ls1.gamma"], torch.ones(cfg.vision.width))
    assert_bitwise(tower_state(model), imported.state)


def test_import_writes_a_run_that_eval_loads(run, tmp_path):
    from fasttips.eval.loading import load_for_eval
    root, cfg, model = run
    cli.export(root, "tips", tmp_path / "rel")
    from fasttips.interop import import_command
    # width 64 is no released size: the npz files do not determine the head count, so it is given
    assert import_command.main([str(tmp_path / "rel"), str(tmp_path / "imported"), "heads.prototypes=32",
                                "vision.heads=2"]) == 0
    loaded, tok, cfg2, ckpt = load_for_eval(tmp_path / "imported")
    assert ckpt.name == "step_00000000" and cfg2.heads.prototypes == 32
    assert cfg2.vision.pos_grid == cfg.vision.pos_grid and cfg2.text.ln_eps == 1e-5
    assert_bitwise(tower_state(model), loaded.state_dict())
    x = images(2, 56)
    with torch.no_grad():
        assert torch.equal(loaded.vision(x)["cls2"], model.vision(x)["cls2"])
    # importing twice into the same run dir is refused
    assert cli.main(["import", str(tmp_path / "rel"), str(tmp_path / "imported"), "vision.heads=2"]) == 2


def test_teacher_export_reads_the_full_ema_backbone(tmp_path, tok):
    from types import SimpleNamespace

    from fasttips.distributed.checkpoint import CheckpointManager
    from fasttips.teacher import Teacher
    cfg = tiny_cfg(teacher__mode="full_ema")
    model = tiny_model(cfg)
    teacher = Teacher(model, cfg)
    with torch.no_grad():
        for p in teacher.backbone.parameters():
            p.add_(0.25)
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, barrier=lambda: None)
    from fasttips import config
    (tmp_path / "run").mkdir()
    config.save(cfg, tmp_path / "run" / "config.yaml")
    files = {"config.yaml": (tmp_path / "run" / "config.yaml").read_bytes(), "tokenizer.model": tok.serialized()}
    CheckpointManager(tmp_path / "run" / "checkpoints", 1, ctx).save(
        3, {"model": model.state_dict(), "teacher": teacher.state_dict()}, {}, files, {})
    student = read_source(tmp_path / "run").state
    warmstart._CACHE.clear()
    teach = read_source(tmp_path / "run", weights="teacher").state
    assert torch.equal(student["vision.norm.weight"], model.vision.norm.weight)
    assert torch.equal(teach["vision.norm.weight"], teacher.backbone.norm.weight)
    assert torch.equal(teach["text.norm.weight"], student["text.norm.weight"])   # no text EMA


# ------------------------------------------------------------------------------------------------
# warm starts
# ------------------------------------------------------------------------------------------------
def test_resolve_and_init_from_a_release_pair(run, tmp_path):
    root, cfg, model = run
    cli.export(root, "tips", tmp_path / "rel")
    base = tiny_cfg(vision__pos_grid=8, text__ln_eps=1e-6, vision__layerscale=0.0, data__pixel_norm="imagenet")
    new, changes = resolve_init_config(base, tmp_path / "rel", explicit={"vision.heads"})
    assert new.vision.pos_grid == 4 and new.vision.layerscale == 1.0 and new.text.ln_eps == 1e-5
    assert new.data.pixel_norm == "tips" and base.vision.pos_grid == 8          # base left alone
    assert new.data.tokenizer == str(tmp_path / "rel" / "tokenizer.model")
    assert any(c.startswith("vision.pos_grid") for c in changes)
    fresh = build_model(new, device="cpu")
    heads_before = {k: v.clone() for k, v in fresh.state_dict().items() if "head" in k}
    report = init_from(fresh, tmp_path / "rel", new)
    assert_bitwise(tower_state(model), fresh.state_dict(), skip={"logit_scale"})
    assert torch.allclose(fresh.logit_scale, model.logit_scale, atol=1e-6)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in heads_before.items())
    assert "logit_bias" in report.fresh and any("dino_head" in n for n in report.fresh)
    assert "init_from" in report.summary()


def test_a_model_of_another_size_is_refused_before_anything_is_copied(run, tmp_path):
    root, cfg, model = run
    other = tiny_cfg(vision__mlp_hidden=192)
    target = build_model(other, device="cpu")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(LayoutError, match=r"'vision.blocks.0.mlp.fc1.weight' is \[128, 64\] in the source "
                                          r"but \[192, 64\] in the model"):
        init_from(target, root, other)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())   # nothing half-loaded


def test_missing_text_tower_tokenizer_and_low_cap_say_so(run, tmp_path):
    root, cfg, model = run
    cli.export(root, "timm", tmp_path / "timm")
    timm_file = tmp_path / "timm" / "model.safetensors"
    with pytest.raises(SourceError, match="holds no text tower"):
        resolve_init_config(cfg, timm_file)
    # asked for explicitly, the vision tower alone loads; text tower and logit scales stay fresh
    new, _ = resolve_init_config(tiny_cfg(vision__pos_grid=8), timm_file, vision_only=True)
    fresh = build_model(new, device="cpu")
    text_before = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("text.")}
    report = init_from(fresh, timm_file, new, vision_only=True)
    assert torch.equal(fresh.vision.blocks[1].mlp.fc2.weight, model.vision.blocks[1].mlp.fc2.weight)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in text_before.items())
    assert "text.token_embed.weight" in report.fresh and "logit_scale" in report.fresh
    cli.export(root, "tips", tmp_path / "rel")
    (tmp_path / "rel" / "tokenizer.model").unlink()
    warmstart._CACHE.clear()
    with pytest.raises(SourceError, match="no tokenizer.model beside the weights"):
        resolve_init_config(cfg, tmp_path / "rel", explicit={"vision.heads"})
    warmstart._CACHE.clear()
    with pytest.raises(ValueError, match=r"loss.max_logit_scale=100.0: below the imported logit scale .*"
                                         r"set loss.max_logit_scale=201"):
        resolve_init_config(tiny_cfg(loss__max_logit_scale=100.0), root)


def test_tokenizers_that_fasttips_would_shift_are_refused(tmp_path):
    import sentencepiece as spm
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 3), model_writer=model, vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)     # unk 0, no pad piece
    shifted = model.getvalue()
    assert Tokenizer.from_bytes(shifted).offset == 1
    with pytest.raises(SourceError, match="pad id -1, not 0; fasttips would shift every id by one"):
        check_tokenizer(shifted, 64, "src")
    with pytest.raises(SourceError, match="has 64 pieces but the text embedding has 10 rows"):
        check_tokenizer(tokenizer().serialized(), 10, "src")


def test_export_of_a_vision_only_source_to_hf_fails_with_a_message(run, tmp_path, capsys):
    from fasttips.interop import export_command
    root, cfg, model = run
    assert export_command.main([str(root), "--to", "timm", str(tmp_path / "t")]) == 0
    assert f"load with: timm.create_model('local-dir:{tmp_path / 't'}', pretrained=True)" in capsys.readouterr().out
    assert export_command.main([str(tmp_path / "t" / "model.safetensors"), "--to", "hf", str(tmp_path / "h")]) == 2
    assert "holds no text tower (timm); only --to timm can be written" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_pickled_npz_and_unknown_files_are_refused(tmp_path):
    np.savez(tmp_path / "evil_vision.npz", cls_token=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SourceError, match="holds pickled objects; refusing to unpickle"):
        read_source(tmp_path / "evil_vision.npz")
    (tmp_path / "weights.pt").write_bytes(b"not really")
    with pytest.raises(SourceError, match="pickle-based file; it is not read because unpickling can run code"):
        read_source(tmp_path / "weights.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="unknown file type '.txt'"):
        read_source(tmp_path / "notes.txt")
    with pytest.raises(SourceError, match="no such file or folder"):
        read_source(tmp_path / "nothing_here")


def test_frozen_backbone_steps_train_only_the_heads_then_the_loss_falls(run, tmp_path):
    """Warm start through the training step itself (build_training's load_weights hook, as
    train.init_from does), optim.freeze_backbone_steps=3: the towers and logit scales are bit-for-bit
    unchanged while the heads move, then unfrozen steps on one batch make the loss fall."""
    from fasttips.data.batch import synthetic_batch
    from fasttips.distributed import fsdp
    from fasttips.schedules import Schedules
    from fasttips.training import build_training

    root, cfg0, _ = run
    cfg, _ = resolve_init_config(tiny_cfg(optim__lr=0.02, optim__warmup_steps=1, train__steps=60,
                                          loss__teacher_temp_warmup_steps=3, optim__freeze_backbone_steps=3,
                                          train__device="cpu", train__precision="fp32"), root)
    training = build_training(cfg, fsdp.init_distributed(cfg), load_weights=lambda m: init_from(m, root, cfg))
    model = training.model
    loaded = build_model(cfg, device="cpu")
    init_from(loaded, root, cfg)
    backbone = backbone_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(backbone, backbone_parameters(loaded)))   # the source's
    frozen = [p.detach().clone() for p in backbone]
    heads = [p.detach().clone() for p in model.dino_head.parameters()]
    batch = synthetic_batch(6, 56, 28, n_global=1, n_local=2, max_len=cfg.text.max_len,
                            vocab_size=cfg.text.vocab_size, generator=torch.Generator().manual_seed(1))
    g = batch["global_crops"]
    batch["local_crops"] = torch.cat([g[:, :, :28, :28], g[:, :, 28:, 28:]])
    schedules = Schedules(cfg)
    losses = []
    for step in range(25):
        out = training.train_step([batch], schedules(step))
        losses.append(out.loss)
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(frozen, backbone))
            assert not all(torch.equal(a, b) for a, b in zip(heads, model.dino_head.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(frozen, backbone))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, [round(x, 3) for x in losses]
