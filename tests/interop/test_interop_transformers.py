"""The Hugging Face export and import against the real client (transformers' Tipsv2Model), CPU,
fp32, tiny random models. Importing transformers costs seconds, so the module shares fixtures."""
import pytest
import torch
from interop_helpers import CAPTIONS, images, rel_err, save_run, tiny_cfg, tiny_model, tokenizer

transformers = pytest.importorskip("transformers", minversion="5.14")

from fasttips.interop import cli, init_from, resolve_init_config, warmstart  # noqa: E402
from fasttips.models import build_model  # noqa: E402

TOL = 1e-5


def hf_outputs(hf, pixels, ids, pad):
    with torch.no_grad():
        seq = hf.vision_model(pixel_values=pixels).last_hidden_state
        text = hf.text_model(input_ids=ids, attention_mask=(~pad).long()).pooler_output
    return {"cls1": seq[:, 0], "cls2": seq[:, 1], "patch": seq[:, 2:], "text": text}


def fasttips_outputs(model, pixels, ids, pad):
    with torch.no_grad():
        out = dict(model.vision(pixels))
        out["text"] = model.text(ids, pad)
    return out


def assert_same(a: dict, b: dict):
    for key in ("cls1", "cls2", "patch", "text"):
        assert a[key].shape == b[key].shape, key
        assert rel_err(a[key], b[key]) <= TOL, (key, rel_err(a[key], b[key]))


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """Two fasttips runs (GELU + LayerScale; SwiGLU without LayerScale) exported with
    'fasttips export --to hf', each with the model that wrote it."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, over in {"gelu": {}, "swiglu": {"vision__ffn": "swiglu", "vision__mlp_hidden": 96,
                                              "vision__layerscale": 0.0}}.items():
        cfg = tiny_cfg(**over)
        model = tiny_model(cfg, seed=len(name))
        save_run(root / name, cfg, model, tok)
        assert cli.main(["export", str(root / name), "--to", "hf", str(root / f"{name}_hf")]) == 0
        out[name] = (root / f"{name}_hf", model)
    return out



def test_transformers_loads_an_export_from_the_repository_root(exported):
    """Python started in the repository root sees kernels/ as a top-level 'kernels', the name of the
    Hugging Face package that transformers >= 5.25 imports; fasttips' folder must step aside."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from transformers import AutoModel; "
            "m = AutoModel.from_pretrained(sys.argv[1]); print(type(m).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(exported["gelu"][0])], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "Tipsv2Model"

@pytest.mark.parametrize("name", ["gelu", "swiglu"])
def test_transformers_loads_the_export_and_gives_the_same_embeddings(exported, tok, name):
    folder, model = exported[name]
    hf, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert type(hf).__name__ == "Tipsv2Model"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids, pad = tok.encode(CAPTIONS[:5])
    # the native grid (56 px) and a non-square resolution: the position grid is resized alike
    for size in (56, (42, 70)):
        pixels = images(3, size)
        assert_same(hf_outputs(hf, pixels, ids, pad), fasttips_outputs(model, pixels, ids, pad))
    assert hf.temperature.item() == pytest.approx(torch.exp(-model.logit_scale[0]).item(), rel=1e-6)


def test_transformers_tokenizer_from_the_export_gives_fasttips_ids(exported, tok):
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    folder, _ = exported["gelu"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = CAPTIONS[:6] + ["A Cat On A Sofa"]
    enc = hf_tok(texts, padding="max_length", max_length=tok.max_len, truncation=True, return_tensors="pt")
    ids, pad = tok.encode(texts)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"].bool(), ~pad)


def test_a_transformers_model_saved_with_save_pretrained_imports_exactly(tmp_path, tok):
    """transformers' own random Tipsv2Model (LayerScales, CLS, register and position embeddings
    random) → save_pretrained → fasttips warm start → same outputs."""
    from transformers import Tipsv2Config, Tipsv2Model
    config = Tipsv2Config(
        text_config=dict(vocab_size=70, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                           image_size=56, patch_size=14),
        temperature_init_value=0.0123)
    torch.manual_seed(0)
    hf = Tipsv2Model(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name or "token" in name or "position" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(tok.serialized())

    cfg, changes = resolve_init_config(tiny_cfg(text__ln_eps=1e-6, vision__pos_grid=16), tmp_path)
    assert cfg.text.ln_eps == 1e-5 and cfg.vision.pos_grid == 4 and cfg.text.vocab_size == 70
    model = build_model(cfg, device="cpu").eval()
    warmstart._CACHE.clear()
    init_from(model, tmp_path, cfg)
    assert model.logit_scale.tolist() == pytest.approx([-torch.log(torch.tensor(0.0123)).item()] * 2)
    ids, pad = tok.encode(CAPTIONS[3:8])
    for size in (56, (70, 28)):
        pixels = images(2, size, seed=4)
        assert_same(fasttips_outputs(model, pixels, ids, pad), hf_outputs(hf, pixels, ids, pad))


def test_auto_processor_reads_the_export(exported, tok):
    """transformers' image processor needs torchvision (skipped without it) and the tokenizer protobuf."""
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        pytest.skip(f"transformers' Tipsv2ImageProcessor needs torchvision ({type(exc).__name__})")
    import numpy as np
    from PIL import Image
    folder, _ = exported["gelu"]
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    image = Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype("uint8"))
    inputs = processor(images=image, text=[CAPTIONS[0]], return_tensors="pt", max_length=tok.max_len)
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)                  # the native 4×4 grid
    assert 0.0 <= float(inputs["pixel_values"].min()) and float(inputs["pixel_values"].max()) <= 1.0
    assert torch.equal(inputs["input_ids"], tok.encode([CAPTIONS[0]])[0])
