"""bench/plots.py: the plots render from a results file, with the keys the bench scripts write."""
import sys
from pathlib import Path

import torch
from PIL import Image

from fasttips import benchcli

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH_DIR))
import harness  # noqa: E402
import plots  # noqa: E402


def _write_results(folder: Path, seed_rows: int = 0) -> None:
    """Rows made by the harness itself (so every field is the real one), with made-up timings."""
    g = torch.Generator().manual_seed(seed_rows)

    def timing():
        ms = float(torch.rand((), generator=g)) * 10 + 0.1
        return {"ms": ms, "p20": 0.9 * ms, "p80": 1.1 * ms, "n": 10}

    att = harness.Bench("attention", quick=True, device="cpu", results_dir=str(folder))
    for N in (50, 257, 1025):
        for mode in ("fwd", "fwd_bwd"):
            for impl in ("fasttips", "sdpa-default"):
                att.add({"B": 4, "H": 2, "N": N, "D": 64, "dtype": "bf16", "mode": mode}, impl, timing(),
                        flops=harness.attention_flops(4, 2, N, 64, mode))
    att.add({"layer": "multicrop", "images": 2, "mode": "fwd"}, "fasttips-varlen-1-launch", timing(), flops=1e9)
    att.write()
    loss = harness.Bench("dino_loss", quick=True, device="cpu", results_dir=str(folder))
    for T in (64, 256):
        for impl in ("fasttips", "torch-eager"):
            loss.add({"T": T, "K": 512, "d": 256, "mode": "fwd", "centering": "softmax"}, impl, timing(),
                     flops=1e9, peak_mem=T * 1000)
    loss.add({"T": 1024, "K": 512, "d": 256, "mode": "fwd", "centering": "softmax"}, "torch-eager",
             {"ms": float("nan")}, oom=True)                  # an OOM row has no time to draw
    loss.write()
    step = harness.Bench("train_step", quick=True, device="cpu", results_dir=str(folder))
    for preset in ("vit-b", "vit-l"):
        for impl, mfu in (("fasttips", 0.3), ("plain-pytorch", 0.1)):
            step.add({"preset": preset, "batch_per_device": 32}, impl, timing(), flops=1e12,
                     peak_mem=20 * 2**30, images_per_s=100.0 * mfu, mfu=mfu, max_batch=64)
    step.add({"preset": "vit-g", "batch_per_device": 16, "depth": 12}, "fasttips", timing(), peak_mem=None,
             images_per_s=12.0, mfu=None, overrides=["vision.depth=12"])   # vit-g layers, no CUDA memory
    step.write()


def _check_png(path: str) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
        extrema = im.convert("L").getextrema()
        assert extrema[0] < extrema[1], f"{path} is blank"


def test_plots_render_from_a_results_file(tmp_path, seed):
    _write_results(tmp_path, seed)
    written = plots.draw_all(str(tmp_path), str(tmp_path / "plots"))
    names = sorted(Path(p).name.rsplit("-cpu", 1)[0] for p in written)
    assert names == ["attention_tflops", "dino_loss_memory", "dino_loss_time", "train_step"]
    for path in written:
        _check_png(path)


def test_newest_row_per_case_and_impl_wins(tmp_path):
    row = {"bench": "attention", "device": "d", "impl": "a", "case": {"N": 1}}
    rows = [dict(row, date="2026-01-01T00:00", ms=2.0), dict(row, date="2026-01-02T00:00", ms=1.0),
            dict(row, case={"N": 2}, date="2026-01-01T00:00", ms=3.0)]      # an older case, not re-run
    kept = sorted(plots.newest_rows(rows), key=lambda r: r["case"]["N"])
    assert [r["ms"] for r in kept] == [1.0, 3.0]


def test_empty_results_draw_nothing(tmp_path):
    assert plots.draw_all(str(tmp_path), str(tmp_path / "plots")) == []


def test_bench_cli_plots_what_the_benches_write(tmp_path, capsys):
    """The plot keys match the real rows: run two CPU quick benches, then --plot from their JSON."""
    assert benchcli.main(["attention", "step", "--quick", "--plot", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name.split("-")[0] for p in pngs} == {"attention_tflops", "train_step"}, out
    for p in pngs:
        _check_png(str(p))
