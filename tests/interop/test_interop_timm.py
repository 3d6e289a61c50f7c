"""The timm export and import against the real client (vit_*_patch14_reg1_tipsv2), CPU, fp32.

timm requires torchvision, and a torchvision build must match the installed torch exactly (a CPU
torch needs a CPU torchvision); where none imports, these tests are skipped with the reason."""
import json

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
