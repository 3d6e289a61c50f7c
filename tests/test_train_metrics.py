"""The FLOP model against hand counts, MFU, metrics.jsonl, the progress bar and the loss curve."""
from __future__ import annotations

import io
import json

import pytest
import torch

from fasttips import config as config_lib
from fasttips.flops import flop_model, head_params, mfu, peak_flops
from fasttips.runlog import (MetricsWriter, ProgressBar, drop_metrics_after, loss_series, plot_loss_curve, read_metrics,
                             smooth)
from fasttips.models import build_model


def test_flop_model_matches_a_hand_count_for_vit_l():
    cfg = config_lib.load(None, ["preset=vit-l", "data.n_local=0", "heads.prototypes=1024"])
    D, H, L, p = 1024, 4096, 24, 14
    N = (224 // p) ** 2 + 2                                       # 256 patches + 2 CLS
    per_block = N * (8 * D * D + 4 * D * H) + 4 * N * N * D
    embed = 2 * 256 * 3 * p * p * D
    vision_pass = embed + L * per_block
    fm = flop_model(cfg)
    # full + masked view, fwd + bwd: 3× the blocks, 2× the patch embedding (no gradient to pixels)
    assert fm.vision == pytest.approx(2 * (2 * embed + 3 * L * per_block))
    T = 64
    text_pass = 12 * (T * (8 * D * D + 4 * D * H) + 4 * T * T * D)
    assert fm.text == pytest.approx(3 * 2 * text_pass)            # two captions
    head_row = 2 * (D * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 1024)
    assert fm.heads == pytest.approx(head_row * (1 + 256 * 3 + 256))
    # ViT-L/14 forward at 224 px is ~ 2 × 0.3 G params × 258 tokens ≈ 160 GFLOP (+ attention)
    assert 150e9 < vision_pass < 200e9


def test_flop_model_counts_matmuls_of_the_real_model():
    """Multiply-adds of every nn.Linear in one vision pass, counted by hooks, equal the model's."""
    cfg = config_lib.load(None, ["vision.depth=2", "data.global_size=56"])
    model = build_model(cfg, device="cpu")
    counted = []

    def hook(module, inputs, output):
        counted.append(2 * inputs[0].numel() // module.in_features * module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.vision.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model.vision(torch.randn(1, 3, 56, 56))
    for h in handles:
        h.remove()
    N, D = 16 + 2, cfg.vision.width
    attention = cfg.vision.depth * 4 * N * N * D                  # q·kᵀ and p·v (no nn.Linear)
    cfg.data.n_local = 0
    p = cfg.vision.patch_size
    embed = 2 * (56 // p) ** 2 * 3 * p * p * D
    train = flop_model(cfg).vision / 2                            # two global views
    one_pass = (train - 2 * embed) / 3 + embed                    # blocks fwd+bwd = 3×, embedding 2×
    assert sum(counted) + attention == pytest.approx(one_pass, rel=1e-9)


def test_masked_only_ibot_counts_the_expected_masked_patches():
    base = ["preset=vit-l", "data.n_local=0", "heads.prototypes=1024", "data.mask_probability=0.5",
            "data.mask_ratio=[0.1,0.5]"]
    full = flop_model(config_lib.load(None, base))
    masked = flop_model(config_lib.load(None, base + ["loss.ibot_tokens=masked"]))
    head_row = full.heads / (1 + 256 * 3 + 256)
    assert masked.heads == pytest.approx(head_row * (1 + 256 * 0.15 * 3 + 256 * 0.15))
    assert (masked.vision, masked.text) == (full.vision, full.text)


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_head_params_match_the_head_module(nlayers):
    """The head FLOPs and the meta-init size estimate use the head's real weights, any nlayers."""
    cfg = config_lib.load(None, [f"heads.nlayers={nlayers}"])
    head = build_model(cfg, device="meta").dino_head
    weights = sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))
    assert head_params(cfg) == weights + head.prototypes.v.numel()


def test_mfu_and_peak():
    assert mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    assert mfu(1e9, 100.0, None) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_metrics_writer_and_loss_curve(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 4):
        writer.write(step, {"loss": 3.0 / step, "loss/dino": 1.0, "mfu": None, "lr": torch.tensor(0.5)})
    writer.write(4, {"loss": float("nan")})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["lr"] == 0.5 and records[3]["loss"] == "nan"
    json.dumps(records)                                           # plain JSON, no NaN literals
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and png.stat().st_size > 1000


def test_progress_bar_prints_step_terms_rate_and_eta():
    out = io.StringIO()
    bar = ProgressBar(total=10, stream=out, every=5)
    for step in range(10):
        bar.update(step, loss=2.5, terms={"dino": 1.25}, images_per_s=42.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2                                        # not a tty: every 5 steps
    assert lines[-1].startswith("step 10/10 [####################] loss 2.5000 (dino 1.250) 42.0 img/s ETA")


def test_progress_without_redraw_prints_plain_lines_even_on_a_terminal():
    """--no-progress: periodic plain lines, never a carriage-return redraw."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    out = Terminal()
    bar = ProgressBar(total=4, stream=out, every=2, redraw=False)
    for step in range(4):
        bar.update(step, loss=1.0, terms={}, images_per_s=1.0)
    bar.close()
    assert "\r" not in out.getvalue()
    assert [line.split(" [")[0] for line in out.getvalue().splitlines()] == ["step 2/4", "step 4/4"]
    drawn = Terminal()
    ProgressBar(total=4, stream=drawn).update(0, loss=1.0, terms={}, images_per_s=1.0)
    assert drawn.getvalue().startswith("\r")


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])      # no pull towards 0
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])
    assert smooth([1.0, "nan", 3.0], 0.0)[1] == 1.0                             # a skipped step is left out


def test_loss_series_has_every_term_and_the_total():
    records = [{"step": s, "loss": 5.0 - s, "loss/dino": float(s), "loss/clip_alt": 3.0, "lr": 0.1}
               for s in range(1, 21)] + [{"step": 20, "eval/seg/miou": 0.1}]
    series = loss_series(records)
    assert list(series) == ["loss/clip_alt", "loss/dino", "loss"]
    steps, dino = series["loss/dino"]
    assert steps == list(range(1, 21))
    assert dino[0] == 1.0 and 1.0 < dino[-1] < 20.0 and dino == sorted(dino)    # smoothed, still rising


def test_drop_metrics_after_keeps_earlier_steps_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    drop_metrics_after(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    drop_metrics_after(path, 0)
    assert path.read_text() == ""
