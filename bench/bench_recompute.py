"""Activation recomputation: memory per image and step time of each ``train.activation_checkpointing``
policy, on the whole training step.

    python bench/bench_recompute.py [--quick] [--preset tiny] [--batch 16] [--policies off,full,every_k,selective]
                                    [--every 2] [--set KEY=VALUE ...]

One step is ``Training.train_step`` (what ``fasttips train`` runs; FSDP2 with bf16 on a GPU), built by
the step benchmark's ``build_trainer`` on synthetic batches, once per policy in the same process and
at the same batch. Each row holds:

- ``ms`` (median, p20/p80) and images/s: the step's wall time (CUDA events on a GPU); on the CPU
  also ``cpu_s_per_step``, the process CPU time of a step (median of 5), which other processes' load
  moves much less than the wall clock; CPU runs use one torch thread (``--threads``);
- ``peak_mem``: the peak of memory allocated during one step beyond what was allocated when it began
  (the parameters and the optimiser state are already there: this is the activations, the gradients
  and the temporaries), and ``peak_mem_per_image`` = that / the per-device batch. On CUDA it is
  ``torch.cuda.max_memory_allocated`` (harness ``Bench.peak_memory``). On the CPU torch keeps no such
  counter, so ``LiveBytes`` below counts it: every tensor storage an op creates during the step is
  added when it appears and subtracted when it is freed (a weak reference to the storage), and the
  peak of that sum is kept; tensors that existed before the step are not counted, as on CUDA. It
  adds Python work per op, so it runs on a separate step from the timed ones. ``mem_measure`` names
  which one a row used;
- ``gflop_per_image`` (model FLOPs, MFU) and ``hardware_gflop_per_image`` (with the recomputed
  forward, HFU) from ``fasttips.flops.flop_model``; ``mfu``/``hfu`` where the device's peak is known.

CPU rows say how the policies compare in memory and in recomputation overhead on this machine, not
what a GPU does: the GPU variant is the same command on a CUDA machine (default case: vit-l at batch
32, bf16 under FSDP2).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from harness import Bench  # noqa: E402

BASELINE = "off"
POLICIES = ["off", "full", "every_k", "selective"]
# (preset, per-device batch, extra overrides) per device kind. The CPU cases: the tiny preset as it
# trains, and ViT-S blocks (width 384, 6 heads) at 4 blocks and small crops, so that a block has a
# realistic shape while a step stays a few seconds on 2 cores.
CASES = {
    "cuda": [("vit-l", 32, [])],
    "cpu": [("tiny", 16, []),
            ("vit-s", 8, ["vision.depth=4", "text.depth=4", "data.global_size=112", "data.local_size=56",
                          "data.n_local=2", "heads.prototypes=4096"])],
}
CPU_THREADS = 1
QUICK = {
    "cuda": [("vit-s", 32, [])],
    "cpu": [("tiny", 4, ["data.global_size=56", "data.local_size=28"])],
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active that are alive at once (CPU memory
    accounting; see the module docstring). A storage's Python object lives exactly as long as its
    memory, so a weak reference to it says when the memory is freed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self._seen:          # a view or an in-place result: counted already
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    weakref.finalize(storage, self._freed, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def step_memory(bench: Bench, training, step, *args) -> dict:
    """Memory of one ``step(*args)``: ``peak_mem``, the peak beyond what was allocated when it
    began, and ``activation_mem``, what the forward left allocated for the backward (read by a hook
    on the loss module as its forward returns). CUDA: the allocator's counters; CPU: ``LiveBytes``."""
    cuda = bench.device.type == "cuda"
    counter = LiveBytes()
    held = {}

    def after_forward(module, inputs, output):
        held["bytes"] = (torch.cuda.memory_allocated(bench.device) - held["before"]) if cuda else counter.live

    handle = training.loss_forward.register_forward_hook(after_forward)
    try:
        if cuda:
            torch.cuda.synchronize(bench.device)
            held["before"] = torch.cuda.memory_allocated(bench.device)
            peak = bench.peak_memory(step, *args)
            how = "cuda memory_allocated / max_memory_allocated"
        else:
            with counter:
                step(*args)
            peak, how = counter.peak, "cpu live tensor storages (LiveBytes)"
    finally:
        handle.remove()
    return {"peak_mem": int(peak), "activation_mem": int(held["bytes"]), "mem_measure": how}


def cpu_seconds(step, inputs, reps: int = 5) -> float:
    """Median process CPU seconds of one step (all threads) over ``reps``: on a shared CPU this
    moves much less with other processes' load than the wall clock does."""
    samples = []
    for i in range(reps):
        t0 = time.process_time()
        step(*inputs[i % len(inputs)])
        samples.append(time.process_time() - t0)
    return sorted(samples)[len(samples) // 2]


def measure(bench: Bench, preset: str, batch: int, overrides: list[str], policy: str, every: int) -> dict:
    from bench_train_step import _free, _time_steps, build_trainer
    from fasttips.flops import mfu
    ac = [f"train.activation_checkpointing={policy}", f"train.ac_every={every}"]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(preset, batch, overrides + ac, run_dir)
        try:
            it = iter(trainer.loader)
            batches = [trainer.next_batches([it]) for _ in range(2)]
            values = trainer.schedules(100)

            def step(micro_batches):
                trainer.training.train_step(micro_batches, values)

            t0 = time.perf_counter()
            step(batches[0])                    # the optimiser state exists from here on
            first_s = time.perf_counter() - t0
            memory = step_memory(bench, trainer.training, step, batches[1])
            inputs = [(b,) for b in batches]
            timing = _time_steps(bench, step, inputs)
            cpu_s = cpu_seconds(step, inputs, 2 if bench.quick else 5) if bench.device.type == "cpu" else None
            fm, cfg = trainer.flops, trainer.cfg
            images_per_s = batch / (timing["ms"] * 1e-3)
            case = {"preset": preset, "batch_per_device": batch, "depth": cfg.vision.depth,
                    "text_depth": cfg.text.depth, "width": cfg.vision.width,
                    "global_size": cfg.data.global_size, "n_local": cfg.data.n_local,
                    "local_size": cfg.data.local_size, "prototypes": cfg.heads.prototypes,
                    "precision": str(trainer.ctx.param_dtype).replace("torch.", "")}
            impl = f"every_k={every}" if policy == "every_k" else policy
            return bench.add(case=case, impl=impl, timing=timing, flops=fm.hardware_per_image * batch,
                             **memory, peak_mem_per_image=memory["peak_mem"] / batch,
                             activation_mem_per_image=memory["activation_mem"] / batch,
                             cpu_s_per_step=cpu_s, images_per_s=images_per_s,
                             gflop_per_image=fm.per_image / 1e9,
                             hardware_gflop_per_image=fm.hardware_per_image / 1e9,
                             mfu=mfu(fm.per_image, images_per_s, trainer.peak),
                             hfu=mfu(fm.hardware_per_image, images_per_s, trainer.peak),
                             policy=policy, ac_every=every, overrides=overrides + ac,
                             first_step_s=first_s, threads=torch.get_num_threads())
        finally:
            trainer = None
            _free()


def run(quick: bool = False, presets: list[str] | None = None, batch: int | None = None,
        policies: list[str] | None = None, every: int = 2, overrides: list[str] | None = None,
        results_dir: str | None = None, threads: int | None = None) -> Bench:
    bench = Bench("recompute", quick=quick, results_dir=results_dir)
    kind = "cuda" if bench.device.type == "cuda" else "cpu"
    if kind == "cpu":
        # One intra-op thread: a second one spin-waits through every Python-side pause (the
        # selective policy's dispatch mode is Python), which on a shared CPU inflates the CPU time
        # by 2-3x and says nothing about the policy.
        torch.set_num_threads(threads or CPU_THREADS)
    policies = policies or POLICIES
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"policies: {bad} not allowed; choose from {POLICIES}")
    cases = (QUICK if quick else CASES)[kind]
    if presets:
        cases = [(p, batch or 16, []) for p in presets]
    elif batch:
        cases = [(p, batch, extra) for p, _, extra in cases]
    for preset, size, extra in cases:
        extra = extra + list(overrides or [])
        rows = {}
        for policy in policies:
            try:
                row = measure(bench, preset, size, extra, policy, every)
            except torch.OutOfMemoryError:
                print(f"{preset} batch {size} {policy}: out of memory", flush=True)
                continue
            rows[policy] = row
            cpu = f", {row['cpu_s_per_step']:.2f} CPU-s" if row["cpu_s_per_step"] is not None else ""
            print(f"{preset} batch {size} {row['impl']}: {row['ms']:.0f} ms/step{cpu}; per image "
                  f"{row['activation_mem_per_image'] / 2**20:.2f} MiB kept for the backward, "
                  f"{row['peak_mem_per_image'] / 2**20:.2f} MiB step peak; {row['hardware_gflop_per_image']:.2f} "
                  f"hardware / {row['gflop_per_image']:.2f} model GFLOP", flush=True)
        base = rows.get(BASELINE)
        for policy, row in rows.items():
            if base and policy != BASELINE:
                time_ratio = (f"{row['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x the CPU time"
                              if row["cpu_s_per_step"] else f"{row['ms'] / base['ms']:.2f}x the step time")
                print(f"{preset}: {row['impl']} keeps {row['activation_mem'] / base['activation_mem']:.2f}x the "
                      f"activations, {row['peak_mem'] / base['peak_mem']:.2f}x the step peak, {time_ratio} "
                      f"of {BASELINE}", flush=True)
    return bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case, short timing windows")
    parser.add_argument("--preset", action="append", help="preset(s) to measure instead of the defaults")
    parser.add_argument("--batch", type=int, help="per-device batch (default: the case's)")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"from {POLICIES}")
    parser.add_argument("--every", type=int, default=2, help="train.ac_every of the every_k rows (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads on the CPU (default {CPU_THREADS})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every case, e.g. --set vision.depth=8")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",")]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        parser.error(f"--policies: {bad} not allowed; choose from {POLICIES}")
    bench = run(args.quick, args.preset, args.batch, policies, args.every, args.set, threads=args.threads)
    bench.report(baseline=BASELINE)
    print("wrote", bench.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
