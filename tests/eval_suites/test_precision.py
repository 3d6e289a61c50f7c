"""--precision: fp32 by default (the TIPS release evaluates in fp32), bf16 autocast on request."""
import argparse
import json

import pytest
import torch

from fasttips.eval.suites import add_arguments
from fasttips.eval.suites.common import precision_context
from suite_helpers import OracleTokenizer, RecordingModel, colour, run_suite, save_image

def imagenet_fixture(root):
    """Two custom classes (classnames.txt): cheap to prompt, unlike the 1000 ImageNet classes."""
    for c, name in enumerate(("cat", "dog")):
        save_image(root / "val" / name / "a.JPEG", colour(c))
    (root / "classnames.txt").write_text("cat\ndog\n")
    return OracleTokenizer(lambda text: 0 if "cat" in text else 1)


def test_encoders_run_fp32_by_default_and_under_bf16_autocast_on_request(tmp_path):
    tok = imagenet_fixture(tmp_path)
    fp32 = RecordingModel(4)
    res, _ = run_suite(fp32, tok, None, "imagenet", tmp_path, tmp_path)
    assert fp32.seen and not any(autocast for _, autocast in fp32.seen)
    assert json.loads((tmp_path / "out" / "suites.json").read_text())["settings"]["precision"] == "fp32"
    bf16 = RecordingModel(4)
    res_bf16, _ = run_suite(bf16, tok, None, "imagenet", tmp_path, tmp_path, precision="bf16")
    assert bf16.seen and all(autocast for _, autocast in bf16.seen)
    assert res_bf16["metrics"] == res["metrics"]                  # the oracle does not care
    with pytest.raises(ValueError, match="--precision: 'fp16'; choose from fp32, bf16"):
        run_suite(RecordingModel(4), tok, None, "imagenet", tmp_path, tmp_path, precision="fp16")


def test_the_precision_option():
    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).precision == "fp32"
    assert parser.parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])


def test_fp32_on_cuda_turns_tf32_off_for_the_block_and_restores_it():
    """cuDNN allows TF32 by default: the patch embedding would round its inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with precision_context(torch.device("cuda"), "fp32"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with precision_context(torch.device("cpu"), "bf16"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_fp32_on_cuda_matches_the_cpu_and_bf16_does_not(tmp_path, tiny):
    """The tiny model's retrieval embeddings on a GPU: fp32 within 1e-4 of the CPU's, bf16 further off."""
    from fasttips.eval.suites.common import SuiteContext, encode_image_batch
    model, tok, cfg = tiny
    x = torch.rand(4, 3, 28, 28)
    feats = {}
    try:
        for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
            ctx = SuiteContext(model=model.to(device), tokenizer=tok, device=torch.device(device), precision=precision)
            feats[device, precision] = encode_image_batch(ctx, x)["cls1"]
    finally:
        model.to("cpu")                       # the session's tiny model serves the other tests
    ref = feats["cpu", "fp32"]
    err32 = (feats["cuda", "fp32"] - ref).abs().max().item()
    err16 = (feats["cuda", "bf16"] - ref).abs().max().item()
    assert err32 < 1e-4 and err16 > 10 * err32, (err32, err16)
