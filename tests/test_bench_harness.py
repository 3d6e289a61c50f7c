"""bench/harness.py: FLOP/byte models against hand counts, CPU timing quantiles, JSON rows."""
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import harness  # noqa: E402


def test_matmul_flops_hand_count():
    # [3, 5] @ [5, 7]: 21 outputs, each 5 multiplies + 5 adds
    assert harness.matmul_flops(3, 7, 5) == 3 * 7 * 5 * 2
    assert harness.matmul_flops(3, 7, 5, batch=4) == 4 * 210


def test_attention_flops_hand_count():
    # B=2, H=3, N=5, D=8: QKᵀ is 5×5 outputs × 8 MACs, PV the same; 2 FLOPs per MAC
    per_head = 2 * (5 * 5 * 8) * 2
    assert harness.attention_flops(2, 3, 5, 8) == 2 * 3 * per_head
    assert harness.attention_flops(2, 3, 5, 8, "bwd") == int(2.5 * 2 * 3 * per_head)
    assert harness.attention_flops(2, 3, 5, 8, "fwd_bwd") == int(3.5 * 2 * 3 * per_head)
    assert harness.attention_flops(1, 1, 4, 8, N_k=6) == 2 * (4 * 6 * 8) * 2
    assert harness.attention_varlen_flops([5, 3], H=2, D=4) == 2 * (4 * 25 * 4 + 4 * 9 * 4)
    with pytest.raises(ValueError, match="mode"):
        harness.attention_flops(1, 1, 4, 8, "backward")


def test_byte_models_hand_count():
    assert harness.copy_bytes(1000) == 2000
    # fp32 teacher read + write (8 B) + bf16 student read (2 B)
    assert harness.ema_bytes(10, student_bytes=2) == 100
    assert harness.ema_bytes(10) == 120


def test_quantile_matches_torch(seed):
    values = torch.rand(37).tolist()
    for q in (0.2, 0.5, 0.8):
        assert harness.quantile(values, q) == pytest.approx(torch.quantile(torch.tensor(values, dtype=torch.float64), q).item())


def test_cpu_timing_is_sane_and_rotates_inputs():
    bench = harness.Bench("unit", quick=True, device="cpu")
    seen = []

    def fn(x):
        seen.append(x)
        time.sleep(0.002)

    t = bench.time(fn, inputs=[0, 1, 2], warmup_ms=0, rep_ms=20)
    assert 1.5 <= t["p20"] <= t["ms"] <= t["p80"] < 50
    assert t["n"] >= 5
    assert set(seen) == {0, 1, 2}
    assert bench.peak_memory(fn, 0) is None


def test_rows_are_json_with_env_fields(tmp_path):
    bench = harness.Bench("unit", quick=True, device="cpu", results_dir=str(tmp_path))
    timing = {"ms": 2.0, "p20": 1.5, "p80": 2.5, "n": 10}
    bench.add(case={"N": 257}, impl="fast", timing=timing, flops=4e9, bytes=6e6, note="x")
    bench.add(case={"N": 257}, impl="slow", timing={**timing, "ms": 4.0})
    text = bench.report(baseline="slow")
    assert "2.00" in text  # fast is 2× the baseline
    path = bench.write()
    assert path.endswith("unit-" + harness.device_slug(bench.env["device"]) + ".jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 2
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date", "case", "impl", "ms", "p20", "p80"):
        assert key in rows[0], key
    assert rows[0]["tflops"] == pytest.approx(2.0) and rows[0]["gbps"] == pytest.approx(3.0)
    assert rows[0]["pct_copy_bw"] is None  # no ceilings on CPU
    assert rows[0]["note"] == "x"
    bench.write()  # appends
    assert len(open(path).read().splitlines()) == 4


def test_bad_name_is_rejected():
    with pytest.raises(ValueError, match="name"):
        harness.Bench("a/b", device="cpu")


def test_env_var_sets_then_restores(monkeypatch):
    monkeypatch.delenv("FASTTIPS_TEST_SWITCH", raising=False)
    with harness.env_var("FASTTIPS_TEST_SWITCH", "a"):
        assert os.environ["FASTTIPS_TEST_SWITCH"] == "a"
        with harness.env_var("FASTTIPS_TEST_SWITCH", "b"):
            assert os.environ["FASTTIPS_TEST_SWITCH"] == "b"
        assert os.environ["FASTTIPS_TEST_SWITCH"] == "a"
        with harness.env_var("FASTTIPS_TEST_SWITCH", None):       # None: left as it is
            assert os.environ["FASTTIPS_TEST_SWITCH"] == "a"
    assert "FASTTIPS_TEST_SWITCH" not in os.environ
