"""``train.compile``: off, blocks (each transformer block) and step (the whole student forward of a
micro-batch: towers, heads, teacher targets, losses, and through AOTAutograd the backward) train the
same numbers. Compiled with backend="aot_eager" (``fsdp.COMPILE_OPTIONS``): the same graphs Dynamo
captures for inductor, without inductor's minutes of CPU code generation."""
import os

import pytest
import torch
from torch._dynamo.utils import counters

from fasttips import config
from fasttips.distributed import fsdp
from fasttips.schedules import Schedules
from fasttips.training import build_training

from test_step import SMALL, batch_for

STEPS = 3
# the teacher temperature changes at every step: a compiled step must take it as an input, not recompile
OVERRIDES = dict(SMALL, **{"loss.teacher_temp_warmup_steps": STEPS})


def train(mode: str):
    """Losses of STEPS optimiser steps from one seed and the same batches, and the parameters after."""
    cfg = config.load(None, [f"{k}={v}" for k, v in OVERRIDES.items()] + [f"train.compile={mode}"])
    torch.manual_seed(0)
    training = build_training(cfg, fsdp.init_distributed(cfg))
    schedules, batches = Schedules(cfg), torch.Generator().manual_seed(1)
    losses = [training.train_step([batch_for(cfg, batches)], schedules(step)).loss for step in range(STEPS)]
    return losses, {n: p.detach().clone() for n, p in training.model.named_parameters()}


_EAGER: dict = {}


def eager(kernels: str):
    if kernels not in _EAGER:
        _EAGER[kernels] = train("off")
    return _EAGER[kernels]


@pytest.mark.parametrize("mode, kernels", [("blocks", "reference"), ("step", "reference"), ("step", "triton")])
def test_compiled_training_matches_eager(monkeypatch, mode, kernels):
    """"triton": every op on its Triton path, the kernels in the interpreter (FASTTIPS_KERNELS=triton)."""
    if kernels == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the Triton kernels)")
    if mode == "step" and config.step_compile_problem(torch.__version__):
        pytest.skip(f"refused under torch {torch.__version__} (test_step_compile_is_refused_under_torch_2_11)")
    monkeypatch.setenv("FASTTIPS_KERNELS", kernels)
    expected = eager(kernels)
    monkeypatch.setitem(fsdp.COMPILE_OPTIONS, "backend", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    losses, params = train(mode)
    assert counters["stats"]["unique_graphs"] >= 1                      # it did compile
    if mode == "step":
        # one graph for the whole forward, no graph break; one recompile only, when the teacher
        # temperature (a new value every step) turns from a constant into a graph input
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(losses, expected[0], atol=1e-5, rtol=1e-5)
    for name, p in expected[1].items():
        torch.testing.assert_close(params[name], p, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("version, refused", [("2.11.0+cu130", True), ("2.10.1", True), ("2.12.1+cu130", False),
                                               ("2.13.0+cpu", False), ("3.0.0", False)])
def test_step_compile_is_refused_under_torch_2_11(monkeypatch, tmp_path, version, refused):
    """Under torch 2.11 the whole-step compile gives the vision tower wrong gradients from the second
    step on (the losses still match eager; measured against 2.12.1, which matches): the config is
    refused on such a torch, naming the field and what to use instead, and so is compile_step itself."""
    monkeypatch.setattr(torch, "__version__", version)
    args = [f"{k}={v}" for k, v in OVERRIDES.items()] + ["train.compile=step", f"train.run_dir={tmp_path}"]
    if not refused:
        assert config.step_compile_problem(version) is None
        config.load(None, args)
        return
    with pytest.raises(config.ConfigError, match=r"train.compile: step needs torch >= 2.12; torch "
                                                 + version.replace("+", r"\+") + r" .*use train.compile=blocks or off"):
        config.load(None, args)
    with pytest.raises(config.ConfigError, match="train.compile: step needs torch >= 2.12"):
        fsdp.compile_step(torch.nn.Linear(2, 2))
    config.load(None, args[:-2] + ["train.compile=blocks", f"train.run_dir={tmp_path}"])   # blocks is fine


@pytest.mark.gpu
def test_cuda_step_compile_trains_like_eager():
    """train.compile=step on a GPU: inductor, the compiled kernels, bf16 parameters under FSDP2 (one
    process): the same losses as eager to bf16 precision (inductor fuses differently). The one place
    that shows whether Dynamo traces through FSDP2's hooks or splits the graph at them."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiled-kernel test: run with TRITON_INTERPRET=0")
    if config.step_compile_problem(torch.__version__):
        pytest.skip(f"train.compile=step is refused under torch {torch.__version__}")
    runs = {}
    for mode in ("off", "step"):
        cfg = config.load(None, ["preset=tiny", "data.source=synthetic", "data.batch_size=4", "train.device=cuda",
                                 "train.precision=bf16", f"loss.teacher_temp_warmup_steps={STEPS}",
                                 f"train.compile={mode}"])
        torch.manual_seed(0)
        ctx = fsdp.init_distributed(cfg)
        training = build_training(cfg, ctx)
        schedules, batches = Schedules(cfg), torch.Generator().manual_seed(1)
        torch._dynamo.reset()
        counters.clear()
        runs[mode] = [training.train_step([batch_for(cfg, batches)], schedules(step)).loss for step in range(STEPS)]
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        print(f"train.compile={mode}: losses {runs[mode]}, {graphs} graphs, {breaks} graph breaks")
        fsdp.shutdown(ctx)
    torch.testing.assert_close(runs["step"], runs["off"], atol=2e-2, rtol=2e-2)

