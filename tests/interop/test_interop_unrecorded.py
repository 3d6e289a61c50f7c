"""What the imported files do not record is never guessed: the head count of a TIPS npz pair or a bare
timm file comes from the released models' table where the width is a released one (said in a note;
an explicit value wins), from a config beside the weights, or from the user, and is refused with one
line naming vision.heads otherwise. timm exports carry fasttips' preprocessing in their configs."""
import json

import pytest
import torch
from interop_helpers import images, rel_err, save_run, tiny_cfg, tiny_model, tokenizer

from fasttips.interop import SourceError, cli, formats, read_source, resolve_init_config, warmstart


@pytest.fixture(autouse=True)
def fresh_cache():
    warmstart._CACHE.clear()
    yield
    warmstart._CACHE.clear()


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory):
    """A width-64 model with 4 heads (the tiny preset has 2) as a TIPS npz pair and as a fasttips run."""
    root = tmp_path_factory.mktemp("four")
    cfg = tiny_cfg(vision__heads=4)
    model = tiny_model(cfg, seed=11)
    save_run(root / "run", cfg, model, tokenizer())
    cli.export(root / "run", "tips", root / "rel")
    return root, cfg, model


def test_an_npz_pair_of_an_unreleased_width_needs_the_head_count(four_heads, tmp_path, capsys):
    root, cfg, model = four_heads
    assert cli.main(["import", str(root / "rel"), str(tmp_path / "guessed")]) == 2
    err = capsys.readouterr().err
    assert "vision.heads is not determined by the weights" in err and "width 64 is not a released size" in err
    assert "give it explicitly: vision.heads=N" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "guessed").exists()
    with pytest.raises(SourceError, match="vision.heads is not determined"):
        resolve_init_config(tiny_cfg(), root / "rel")

    # given, the import is the model itself; the wrong count would give other features
    from fasttips.eval.loading import load_for_eval
    x = images(2, 56, seed=3)
    with torch.no_grad():
        want = model.vision(x)["cls1"]
    feats = {}
    for heads in (4, 2):
        out = tmp_path / f"heads{heads}"
        assert cli.main(["import", str(root / "rel"), str(out), f"vision.heads={heads}"]) == 0
        loaded, _, cfg2, _ = load_for_eval(out)
        assert cfg2.vision.heads == heads
        with torch.no_grad():
            feats[heads] = loaded.vision(x)["cls1"]
    assert rel_err(feats[4], want) <= 1e-6
    assert rel_err(feats[2], want) > 1e-2                   # what the silent guess used to load


def test_train_init_from_an_unreleased_width_takes_an_explicit_head_count(four_heads, capsys):
    from fasttips import config as config_lib
    from fasttips.train import build_parser, main, resolve_config
    root, cfg, model = four_heads
    common = [f"train.init_from={root / 'rel'}", "loss.max_logit_scale=300", "data.source=synthetic",
              "train.steps=1"]
    assert main(common + ["--no-progress"]) == 2
    assert "train.init_from:" in capsys.readouterr().err
    new, _, _ = resolve_config(build_parser().parse_intermixed_args(common + ["vision.heads=4"]))
    assert new.vision.heads == 4 and new.vision.width == 64
    assert config_lib.explicit_keys(None, ["vision.heads=4", "preset=tiny"]) == {"vision.heads", "preset"}


def test_a_released_width_takes_the_release_head_count_unless_set(tmp_path):
    cfg = tiny_cfg(vision__width=384, vision__heads=12, vision__mlp_hidden=64, vision__depth=1, text__depth=1)
    model = tiny_model(cfg)
    formats.write_tips(tmp_path / "rel", model.state_dict(), tokenizer().serialized())
    imported = read_source(tmp_path / "rel")
    assert imported.conventions == {"vision.heads": 6} and "vision.heads" not in imported.overrides
    assert any("vision.heads=6, the released models' head count for width 384" in n for n in imported.notes)
    warmstart._CACHE.clear()
    new, changes = resolve_init_config(tiny_cfg(), tmp_path / "rel")
    assert new.vision.heads == 6 and "vision.heads: 2 → 6" in changes
    warmstart._CACHE.clear()
    new, _ = resolve_init_config(tiny_cfg(vision__width=384, vision__heads=12), tmp_path / "rel",
                                 explicit={"vision.heads"})
    assert new.vision.heads == 12                        # the user's count: this model has 12


def test_a_timm_export_records_heads_and_pixels_a_bare_file_does_not(tmp_path):
    cfg = tiny_cfg(vision__heads=4, data__pixel_norm="imagenet")
    save_run(tmp_path / "run", cfg, tiny_model(cfg), tokenizer())
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(tmp_path / "t")]) == 0
    for src in (tmp_path / "t", tmp_path / "t" / "model.safetensors"):
        imported = read_source(src)
        assert imported.kind == "timm" and imported.overrides["vision.heads"] == 4
        assert imported.overrides["data.pixel_norm"] == "imagenet" and not imported.undetermined
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "net.safetensors").write_bytes((tmp_path / "t" / "model.safetensors").read_bytes())
    imported = read_source(bare / "net.safetensors")
    assert "vision.heads" in imported.undetermined
    assert cli.main(["export", str(bare / "net.safetensors"), "--to", "timm", str(tmp_path / "t2")]) == 2
    assert cli.main(["export", str(bare / "net.safetensors"), "--to", "timm", str(tmp_path / "t2"),
                     "vision.heads=4"]) == 0
    assert json.loads((tmp_path / "t2" / "config.json").read_text())["model_args"]["num_heads"] == 4
    # only what the source does not record can be given to export
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(tmp_path / "t3"), "vision.heads=2"]) == 2
    # nor can an import change what the source records
    assert cli.main(["import", str(tmp_path / "run"), str(tmp_path / "i"), "vision.heads=2"]) == 2
    assert cli.main(["import", str(tmp_path / "run"), str(tmp_path / "i"), "vision.heads=4"]) == 0


def test_init_from_a_timm_file_names_what_to_use_instead(tmp_path):
    cfg = tiny_cfg()
    save_run(tmp_path / "run", cfg, tiny_model(cfg), tokenizer())
    cli.export(tmp_path / "run", "timm", tmp_path / "t")
    with pytest.raises(SourceError) as info:
        resolve_init_config(cfg, tmp_path / "t" / "model.safetensors")
    assert "use a Hugging Face tipsv2 folder, a TIPS npz pair or a fasttips run" in str(info.value)
    assert "vision tower alone" not in str(info.value)


@pytest.mark.parametrize("pixel_norm, size", [("tips", None), ("imagenet", 42)])
def test_exports_carry_the_evaluation_preprocessing(tmp_path, pixel_norm, size):
    """timm: input size, bicubic, crop_pct 1.0 (shorter side to the size, centre crop), mean/std;
    Hugging Face: the same in preprocessor_config.json."""
    cfg = tiny_cfg(data__pixel_norm=pixel_norm)
    save_run(tmp_path / "run", cfg, tiny_model(cfg), tokenizer())
    extra = ["--img-size", str(size)] if size else []
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(tmp_path / "t"), *extra]) == 0
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if pixel_norm == "imagenet" else ([0.0] * 3, [1.0] * 3)
    S = size or 56
    hub = json.loads((tmp_path / "t" / "config.json").read_text())
    legacy = json.loads((tmp_path / "t" / "timm_model.json").read_text())
    for pre in (hub["pretrained_cfg"], legacy["pretrained_cfg"]):
        assert pre["input_size"] == [3, S, S] and pre["interpolation"] == "bicubic"
        assert pre["crop_pct"] == 1.0 and pre["crop_mode"] == "center"
        assert pre["mean"] == pytest.approx(mean) and pre["std"] == pytest.approx(std)
    assert hub["architecture"] == "vit_base_patch14_reg1_tipsv2" and hub["model_args"]["img_size"] == S
    assert cli.main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "h")]) == 0
    proc = json.loads((tmp_path / "h" / "preprocessor_config.json").read_text())
    assert proc["size"] == {"shortest_edge": 56} and proc["crop_size"] == {"height": 56, "width": 56}
    assert proc["do_center_crop"] is True and proc["resample"] == 3 and proc["rescale_factor"] == 1 / 255
    assert proc["do_normalize"] is (pixel_norm == "imagenet")
    if pixel_norm == "imagenet":
        assert proc["image_mean"] == pytest.approx(mean) and proc["image_std"] == pytest.approx(std)
