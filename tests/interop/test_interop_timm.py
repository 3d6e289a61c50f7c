"""The timm export and import against the real client (vit_*_patch14_reg1_tipsv2), CPU, fp32.

timm requires torchvision, and a torchvision build must match the installed torch exactly (a CPU
torch needs a CPU torchvision); where none imports, these tests are skipped with the reason. The
export's preprocessing config is checked without timm in test_interop_unrecorded.py."""
import json

import numpy as np
import pytest
import torch
from interop_helpers import images, rel_err, save_run, tiny_cfg, tiny_model, tokenizer

try:
    import timm
    from safetensors.torch import load_file, save_file
except Exception as exc:                  # ImportError, or torchvision built for another torch
    pytest.skip(f"timm is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

from fasttips.interop import cli, read_source  # noqa: E402
from fasttips.models import build_model  # noqa: E402

TOL = 1e-5


@pytest.mark.parametrize("ffn, mlp, size", [("gelu", 128, 56), ("swiglu", 96, 56), ("gelu", 128, 42)])
def test_timm_loads_the_export_and_gives_the_same_tokens(tmp_path, ffn, mlp, size):
    """At the native grid, and at another size through --img-size (the grid is stored resized)."""
    cfg = tiny_cfg(vision__ffn=ffn, vision__mlp_hidden=mlp)
    model = tiny_model(cfg, seed=5)
    save_run(tmp_path / "run", cfg, model, tokenizer())
    extra = ["--img-size", str(size)] if size != 56 else []
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(tmp_path / "timm"), *extra]) == 0
    spec = json.loads((tmp_path / "timm" / "timm_model.json").read_text())
    net = timm.create_model(spec["model_name"], pretrained=True, **spec["kwargs"],
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")))
    assert set(net.state_dict()) == set(load_file(tmp_path / "timm" / "model.safetensors"))
    pixels = images(2, size)
    with torch.no_grad():
        tokens = net.eval().forward_features(pixels)
        ours = model.vision(pixels)
    for i, key in ((0, "cls1"), (1, "cls2")):
        assert rel_err(tokens[:, i], ours[key]) <= TOL, key
    assert rel_err(tokens[:, 2:], ours["patch"]) <= TOL


def test_a_timm_model_imports_exactly(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("vit_base_patch14_reg1_tipsv2", pretrained=False, img_size=56, num_classes=0,
                            embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "gamma" in name or "token" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    imported = read_source(tmp_path / "net.safetensors")
    cfg = tiny_cfg(**{k.replace(".", "__"): v for k, v in imported.overrides.items()})
    model = build_model(cfg, device="cpu").eval()
    model.load_state_dict(imported.state, strict=False)
    pixels = images(2, 56, seed=2)
    with torch.no_grad():
        tokens = net.forward_features(pixels)
        ours = model.vision(pixels)
    assert rel_err(ours["cls1"], tokens[:, 0]) <= TOL and rel_err(ours["cls2"], tokens[:, 1]) <= TOL
    assert rel_err(ours["patch"], tokens[:, 2:]) <= TOL


def fasttips_eval_pixels(image, crop: int, resize: int, pixel_norm: str) -> torch.Tensor:
    """fasttips' evaluation preprocessing of a PIL image: shorter side to ``resize`` (bicubic), the
    central ``crop`` square, then the run's normalisation."""
    from fasttips.data.augment import normalize
    from fasttips.eval.transforms import resize_center_crop
    return normalize(torch.from_numpy(np.array(resize_center_crop(image, resize, crop))[None]), pixel_norm)


def photo():
    """A real photograph (scikit-image's cat, 451×300): not square, so resize and crop both act."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    return Image.fromarray(skimage_data.chelsea())


@pytest.mark.parametrize("pixel_norm, img_size", [("tips", None), ("imagenet", None), ("tips", 42)])
def test_timms_own_transform_gives_fasttips_features(tmp_path, pixel_norm, img_size):
    """timm.data.resolve_data_config + create_transform on a PIL image, for the model made from the
    export's config.json ('local-dir:') and from timm_model.json: the same pixels as fasttips'
    evaluation preprocessing, and the same features."""
    from PIL import Image  # noqa: F401
    cfg = tiny_cfg(data__pixel_norm=pixel_norm)
    model = tiny_model(cfg, seed=9)
    save_run(tmp_path / "run", cfg, model, tokenizer())
    extra = ["--img-size", str(img_size)] if img_size else []
    out = tmp_path / "timm"
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(out), *extra]) == 0
    spec = json.loads((out / "timm_model.json").read_text())
    nets = {"local-dir": timm.create_model(f"local-dir:{out}", pretrained=True),
            "timm_model.json": timm.create_model(spec["model_name"], pretrained=True, **spec["kwargs"],
                                                 pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                                             **spec["pretrained_cfg"]))}
    size = img_size or 56
    image = photo()
    ours = fasttips_eval_pixels(image, size, size, pixel_norm)
    with torch.no_grad():
        want = model.vision(ours)
    for how, net in nets.items():
        data_config = timm.data.resolve_data_config(model=net.eval())
        assert tuple(data_config["input_size"]) == (3, size, size), how
        pixels = timm.data.create_transform(**data_config)(image).unsqueeze(0)
        assert pixels.shape == ours.shape and (pixels - ours).abs().max() <= 1e-6, how
        with torch.no_grad():
            tokens = net.forward_features(pixels)
        assert rel_err(tokens[:, 0], want["cls1"]) <= TOL and rel_err(tokens[:, 1], want["cls2"]) <= TOL, how
        assert rel_err(tokens[:, 2:], want["patch"]) <= TOL, how


def test_timm_with_knn_crop_pct_gives_fasttips_knn_features(tmp_path):
    """DINOv2's kNN protocol (resize 256, crop 224 = crop_pct 0.875) through timm's override."""
    cfg = tiny_cfg()
    model = tiny_model(cfg, seed=4)
    save_run(tmp_path / "run", cfg, model, tokenizer())
    assert cli.main(["export", str(tmp_path / "run"), "--to", "timm", str(tmp_path / "timm")]) == 0
    net = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({"crop_pct": 0.875}, model=net)
    image = photo()
    pixels = timm.data.create_transform(**data_config)(image).unsqueeze(0)
    ours = fasttips_eval_pixels(image, 56, 64, "tips")
    assert (pixels - ours).abs().max() <= 1e-6
    with torch.no_grad():
        assert rel_err(net.forward_features(pixels)[:, 0], model.vision(ours)["cls1"]) <= TOL


def test_transformers_processor_of_the_hf_export_crops_like_fasttips(tmp_path):
    """transformers' Tipsv2ImageProcessor (torchvision backend) reads the export's
    preprocessor_config.json: shorter side, bicubic, centre crop, [0, 1]. Its resize is not PIL's, so
    pixels may differ by one grey level (0.002 on average on this photo)."""
    transformers = pytest.importorskip("transformers", minversion="5.14")
    cfg = tiny_cfg()
    save_run(tmp_path / "run", cfg, tiny_model(cfg), tokenizer())
    assert cli.main(["export", str(tmp_path / "run"), "--to", "hf", str(tmp_path / "hf")]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    image = photo()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = fasttips_eval_pixels(image, 56, 56, "tips")
    assert pixels.shape == ours.shape
    diff = (pixels - ours).abs() * 255          # rounding of the uint8 resize: at most one grey level
    assert float(diff.max()) <= 1.01 and float(diff.mean()) <= 0.05, (float(diff.max()), float(diff.mean()))
