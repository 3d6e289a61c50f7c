"""`fasttips bench --quick` on CPU (reference backends, tiny shapes) writes valid JSON rows; the
step benchmark's plain-PyTorch baseline ops match the references and are swapped back afterwards."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fasttips import benchcli

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
ENV_FIELDS = ("bench", "case", "impl", "ms", "p20", "p80", "reps", "device", "torch", "triton", "cuda",
              "python", "git_commit", "date", "quick", "ceilings")
FILE_STEM = {"attention": "attention", "dino-loss": "dino_loss", "ema": "ema", "data": "data",
             "step": "train_step", "checkpoint": "checkpoint",
             "dispatch": "dispatch", "recompute": "recompute"}


def _rows(folder: Path, name: str) -> list[dict]:
    files = sorted(folder.glob(f"{FILE_STEM[name]}-*.jsonl"))
    assert len(files) == 1, f"expected one results file for {name}, found {files}"
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _check_rows(rows: list[dict], name: str) -> None:
    assert rows, f"{name}: no rows written"
    for row in rows:
        for key in ENV_FIELDS:
            assert key in row, f"{name}: row lacks {key!r}: {sorted(row)}"
        assert row["bench"] == FILE_STEM[name] and row["quick"] is True
        assert row["device"].startswith("cpu") and row["torch"] == torch.__version__
        assert isinstance(row["case"], dict) and row["case"]
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["p20"] <= row["p80"]
        if name != "data":       # the loader bench's ms is a throughput window's mean, not the median
            assert row["p20"] <= row["ms"] <= row["p80"]


def _run(names, tmp_path, capsys):
    assert benchcli.main([*names, "--quick", "--results", str(tmp_path)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["attention", "ema", "step", "dispatch", "recompute"])
def test_quick_bench_writes_valid_json(name, tmp_path, capsys):
    out = _run([name], tmp_path, capsys)
    assert "wrote" in out and str(tmp_path) in out
    rows = _rows(tmp_path, name)
    _check_rows(rows, name)
    impls = {r["impl"] for r in rows}
    if name == "attention":
        assert {"fasttips", "sdpa-default"} <= impls
        assert "need CUDA" in out                      # CUDA-only peers are skipped with a reason
        assert all(r["tflops"] > 0 and r["flops"] > 0 for r in rows)
        multicrop = {r["impl"] for r in rows if r["case"].get("layer") == "multicrop"}
        assert multicrop == {"fasttips-varlen-1-launch", "fasttips-per-size-2-launches", "sdpa-default-per-size"}
    if name == "ema":
        assert {"fasttips", "foreach_lerp", "foreach_mul_add", "loop_lerp"} <= impls
        assert all(r["gbps"] > 0 for r in rows)
    if name == "step":
        assert impls == {"fasttips", "plain-pytorch", "plain-pytorch-head-ema"}
        by_impl = {r["impl"]: r for r in rows}
        assert by_impl["plain-pytorch"]["teacher_mode"] == "full_ema"
        assert by_impl["plain-pytorch-head-ema"]["teacher_mode"] == "head_ema"
        assert by_impl["fasttips"]["teacher_mode"] == "head_ema"
        assert by_impl["plain-pytorch"]["case"] == by_impl["fasttips"]["case"]   # same model, same batch
        assert all(r["images_per_s"] > 0 and "max_batch" not in r for r in rows)  # no search on CPU
    if name == "dispatch":    # one row per (site, timed candidate), with its site and the decision
        assert {r["case"]["op"] for r in rows} == {"attention", "attention_varlen", "prototype_cross_entropy",
                                                   "ema_update_"}
        assert {"sdpa-math", "per-size", "reference", "foreach_lerp"} <= impls
        assert all(r["site"] and r["winner"] and r["why"] == "measured" for r in rows)
        assert "== dispatch measured live" in out and "→ per-size(" in out
        assert "fasttips kernels are left out" in out and "fasttips" not in impls   # no interpreter timing
    if name == "recompute":
        by_impl = {r["impl"]: r for r in rows}
        assert set(by_impl) == {"off", "full", "every_k=2", "selective"}
        assert len({json.dumps(r["case"], sort_keys=True) for r in rows}) == 1      # same model, same batch
        # what the forward keeps for the backward is counted exactly on the CPU: full < selective < off
        kept = {k: r["activation_mem"] for k, r in by_impl.items()}
        assert 0 < kept["full"] < kept["every_k=2"] < kept["off"] and kept["selective"] < kept["off"]
        assert all(r["peak_mem"] >= r["activation_mem"] and r["cpu_s_per_step"] > 0 for r in rows)
        assert by_impl["selective"]["hardware_gflop_per_image"] == by_impl["off"]["gflop_per_image"]
        assert by_impl["full"]["hardware_gflop_per_image"] > by_impl["full"]["gflop_per_image"]


def test_quick_dino_loss_on_cpu(tmp_path, capsys):
    out = _run(["dino-loss"], tmp_path, capsys)
    assert "torch-compile skipped" in out
    rows = _rows(tmp_path, "dino-loss")
    _check_rows(rows, "dino-loss")
    assert {r["impl"] for r in rows} == {"fasttips", "torch-eager", "reference"}
    assert {r["case"]["mode"] for r in rows} == {"fwd", "fwd_bwd"}


def test_dino_loss_targets_compare_each_path_with_compile_and_eager():
    """The issue-27 summary at the target case: speed over torch-compile's, memory as % of eager's."""
    sys.path.insert(0, str(BENCH_DIR))
    bench = benchcli.load_bench("bench_dino_loss.py")
    T, K = bench.TARGET

    def row(impl, ms, peak, mode="fwd_bwd", case=(T, K), **extra):
        return {"impl": impl, "ms": ms, "peak_mem": peak, "case": {"T": case[0], "K": case[1], "mode": mode},
                **extra}

    rows = [row("torch-compile", 13.0, 8e9), row("torch-eager", 50.0, 16e9), row("fasttips", 18.0, 0.4e9),
            row("fasttips-chunked", 6.5, 0.5e9), row("fasttips-chunked", 1.0, 0.1e9, mode="fwd"),
            row("fasttips-slab", 1.0, 1e6, case=(4096, K)), row("fasttips-slab", 9.0, 1e9, oom=True)]
    got = {r["impl"]: r for r in bench.targets(rows)}
    assert got["fasttips-chunked"]["speedup_vs_compile"] == pytest.approx(2.0)
    assert got["fasttips-chunked"]["memory_pct_of_eager"] == pytest.approx(100 * 0.5 / 16)
    assert got["fasttips-chunked"]["met"] and not got["fasttips"]["met"]          # 0.72× compile
    assert got["fasttips-slab"]["speedup_vs_compile"] is None and not got["fasttips-slab"]["met"]


@pytest.mark.slow
def test_quick_all_writes_every_bench(tmp_path, capsys):
    _run(["all"], tmp_path, capsys)
    for name in FILE_STEM:
        _check_rows(_rows(tmp_path, name), name)


def test_quick_checkpoint_bench_times_both_modes(tmp_path, capsys):
    _run(["checkpoint"], tmp_path, capsys)
    rows = _rows(tmp_path, "checkpoint")
    _check_rows(rows, "checkpoint")
    assert [r["impl"] for r in rows] == ["sync", "async"] and rows[0]["case"] == rows[1]["case"]
    for row in rows:                        # the caller waits at most until the checkpoint is complete
        assert row["checkpoint_bytes"] > 10e6 and row["write_ms"] >= row["ms"] > 0


def test_bench_scripts_are_the_installed_fasttips_bench_package(tmp_path, monkeypatch):
    """`fasttips bench` finds its scripts as the package fasttips.bench (so a wheel has them), and
    outside a source checkout writes results under the working directory, not into the package."""
    import importlib.util
    spec = importlib.util.find_spec("fasttips.bench")
    assert spec is not None and Path(benchcli.bench_dir()) == Path(spec.submodule_search_locations[0])
    assert (benchcli.bench_dir() / "bench_train_step.py").is_file()
    assert benchcli.default_results_dir(BENCH_DIR) == BENCH_DIR / "results"       # this checkout
    installed = tmp_path / "site-packages" / "fasttips" / "bench"                  # a wheel's copy
    installed.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert benchcli.default_results_dir(installed) == tmp_path / "bench-results"


def test_unknown_bench_name_is_rejected(capsys):
    assert benchcli.main(["attn"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


# -- the plain-PyTorch baseline's ops (bench_train_step.plain_pytorch_ops) ------------------------
@pytest.fixture(scope="module")
def step_bench():
    sys.path.insert(0, str(BENCH_DIR))
    return benchcli.load_bench("bench_train_step.py")


def test_plain_ops_match_references_and_are_restored(step_bench, seed):
    import fasttips.kernels as ops
    from fasttips.kernels.attention import reference as attn_ref
    from fasttips.kernels.dino_loss import reference as loss_ref

    originals = {n: getattr(ops, n) for n in ("attention", "attention_varlen", "prototype_cross_entropy",
                                               "ema_update_")}
    H, D = 3, 16
    lengths = [9, 9, 4, 4, 4, 7]                       # runs of equal lengths, then a lone one
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), H, D) for _ in range(3))
    qd, kd, vd = (torch.randn(2, H, 5, D) for _ in range(3))
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    K, d, rows = 40, 8, 6
    loss_args = (torch.nn.functional.normalize(torch.randn(rows, d), dim=1), torch.randn(K, d), torch.rand(K) + 0.5,
                 torch.nn.functional.normalize(torch.randn(rows, d), dim=1), torch.randn(K, d), torch.rand(K) + 0.5,
                 torch.randperm(rows), torch.full((rows,), 1.0 / rows))
    center = 0.1 * torch.randn(K)
    teacher = [torch.randn(7), torch.randn(3, 2)]
    student = [torch.randn(7), torch.randn(3, 2)]
    with step_bench.plain_pytorch_ops():
        assert ops.attention is step_bench.sdpa_attention
        varlen = ops.attention_varlen(q, k, v, cu, max_seqlen=9)
        dense = ops.attention(qd, kd, vd, key_padding_mask=pad)
        loss, stat = ops.prototype_cross_entropy(*loss_args, center=center, chunk_bytes=1 << 20)
        expected_t = [0.9 * t + 0.1 * s for t, s in zip(teacher, student)]
        ops.ema_update_(teacher, student, 0.9)
    assert {n: getattr(ops, n) for n in originals} == originals
    torch.testing.assert_close(varlen, attn_ref.attention_varlen(q, k, v, cu), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, attn_ref.attention(qd, kd, vd, key_padding_mask=pad), rtol=1e-5, atol=1e-5)
    ref_loss, ref_stat = loss_ref.prototype_cross_entropy(*loss_args, center=center)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stat, ref_stat, rtol=1e-5, atol=1e-6)
    for t, e in zip(teacher, expected_t):
        torch.testing.assert_close(t, e)


def test_plain_ops_are_restored_after_an_error(step_bench):
    import fasttips.kernels as ops
    before = ops.attention
    with pytest.raises(RuntimeError, match="boom"):
        with step_bench.plain_pytorch_ops():
            raise RuntimeError("boom")
    assert ops.attention is before


def test_max_batch_doubles_until_it_does_not_fit(step_bench, monkeypatch):
    tried = []

    def fits(preset, batch, overrides, kernels):
        tried.append(batch)
        return batch <= 50
    monkeypatch.setattr(step_bench, "fits", fits)
    assert step_bench.max_batch("vit-b", 6, [], "auto") == 48
    assert tried == [12, 24, 48, 96]
    assert step_bench.max_batch("vit-b", 6, [], "auto", cap=20) == 12     # never past the cap


def test_first_fit_compares_impls_only_at_a_batch_where_all_ran(step_bench, monkeypatch):
    import harness
    bench = harness.Bench("unit", quick=True, device="cpu", measure_device_ceilings=False)

    def measure(bench_, preset, batch, extra, kernels):
        if kernels == "plain" and batch > 8:          # the baseline runs out of memory first
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return bench_.add({"preset": preset, "batch_per_device": batch}, step_bench.IMPLS[kernels][0],
                          {"ms": 1.0, "p20": 1.0, "p80": 1.0, "n": 1}, images_per_s=batch / 1e-3, mfu=None,
                          peak_mem=None, first_step_s=0.0)
    monkeypatch.setattr(step_bench, "measure", measure)
    rows = step_bench._measure_first_fit(bench, "vit-b", [32, 16, 8], [], ["auto", "plain"])
    assert [r["case"]["batch_per_device"] for r in rows] == [8, 8]
    assert [r["case"]["batch_per_device"] for r in bench.rows] == [8, 8]   # the OOM'd batches left no rows
    assert step_bench._measure_first_fit(bench, "vit-b", [32, 16], [], ["auto", "plain"]) is None


def test_first_fit_reraises_errors_that_are_not_out_of_memory(step_bench, monkeypatch):
    import harness
    bench = harness.Bench("unit", quick=True, device="cpu", measure_device_ceilings=False)

    def measure(*args):
        raise RuntimeError("shape mismatch in layer 3")
    monkeypatch.setattr(step_bench, "measure", measure)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        step_bench._measure_first_fit(bench, "vit-b", [32, 16], [], ["auto"])
    assert step_bench._is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))


def test_max_batch_refines_between_the_last_fit_and_the_first_miss(step_bench, monkeypatch):
    tried = []

    def fits(preset, batch, overrides, kernels):
        tried.append(batch)
        return batch <= 40
    monkeypatch.setattr(step_bench, "fits", fits)
    assert step_bench.max_batch("vit-b", 6, [], "auto", refine=2) == 36
    assert tried == [12, 24, 48, 36, 42]                   # doubling, then two bisection steps


def test_compile_variants_name_their_rows_and_set_the_config(step_bench):
    assert step_bench.variants(["plain", "auto"], [False, True]) == ["plain", "plain+compile", "auto",
                                                                      "auto+compile"]
    with step_bench.implementation("plain-head+compile") as (name, extra):
        assert name == "plain-pytorch-head-ema+compile"
        assert extra == ["teacher.mode=head_ema", "train.compile=true"]
