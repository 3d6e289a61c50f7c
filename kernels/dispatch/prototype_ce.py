"""Candidates of ``prototype_cross_entropy``, its site, its memory rule, and how each is timed.

In timing order (names as in bench/results rows):
  fasttips, fasttips-chunked, fasttips-slab   the Triton path with backward="fused" / "chunked" / "slab"
  reference                                   the chunked PyTorch reference (fp32; the CPU path)
  reference-compile                           the same function under torch.compile (CUDA only; its
                                              first call compiles, so it is timed last)

Memory rule: each candidate's working set (``working_bytes``: the gradients, the fp32 weight-normed
prototypes and the candidate's own row slab) must fit ``kernels.memory_fraction`` of the free device
memory, or it is neither timed nor chosen. The naive unfused loss (a full [rows × K] fp32 tensor, bf16
logits under autocast) is not a candidate: it is a benchmark peer, not the same numerics.
"""
from __future__ import annotations

import functools

import torch

from .. import _backend
from .site import Candidate, Site, dtype_name, size_class
from .timing import own_autograd

ARG_NAMES = ("student_z", "student_v", "student_g", "teacher_z", "teacher_v", "teacher_g", "pairs", "weights")
# in timing order: the measured path, then the one estimated fastest (cuBLAS products on row chunks)
PATHS = {"fasttips": "fused", "fasttips-chunked": "chunked", "fasttips-slab": "slab"}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def fields(device: str, dtype: str, S: int, T: int, K: int, d: int, centering: str, backward) -> tuple:
    return (("device", device), ("dtype", dtype), ("S", size_class(S)), ("T", size_class(T)), ("K", int(K)),
            ("d", int(d)), ("centering", centering), ("backward", backward))


def site(student_z, student_v, teacher_z, centering: str, backward: str | None) -> Site:
    """``backward``: a Triton path asked for by name (it forces that path), or None."""
    grad = torch.is_grad_enabled() and (student_z.requires_grad or student_v.requires_grad)
    return Site("prototype_cross_entropy", "fwd_bwd" if grad else "fwd", fields(
        student_z.device.type, dtype_name(student_z.dtype), student_z.shape[0], teacher_z.shape[0],
        student_v.shape[0], student_z.shape[1], centering, backward))


# --------------------------------------------------------------------------------------------------
# implementations: run(*ARG_NAMES tensors, chunk_bytes=None, **options) → (loss, center_stat)
# --------------------------------------------------------------------------------------------------
def _triton_path(path: str):
    def run(*args, chunk_bytes=None, **options):
        from ..dino_loss import triton as module
        return module.prototype_cross_entropy(*args, backward=path, **options)
    return run


def _reference(*args, chunk_bytes=None, **options):
    from ..dino_loss import reference
    return reference.prototype_cross_entropy(*args, chunk_bytes=chunk_bytes, **options)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    from ..dino_loss import reference
    return torch.compile(reference.prototype_cross_entropy, dynamic=False)


def _reference_compile(*args, chunk_bytes=None, **options):
    return _compiled_reference()(*args, chunk_bytes=chunk_bytes, **options)


# --------------------------------------------------------------------------------------------------
# support and memory rules
# --------------------------------------------------------------------------------------------------
def meta_features(s: Site) -> torch.Tensor:
    """A [0, d] tensor of the site's dtype: what ``dino_loss.common.unsupported_on_gpu`` looks at."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(s["dtype"], torch.float32)
    return torch.empty((0, s["d"]), dtype=dtype, device="meta")


def unsupported(s: Site) -> str | None:
    """Why the Triton path cannot take these inputs (the rule the forced path applies too)."""
    from ..dino_loss import common
    return common.unsupported_on_gpu(meta_features(s), _backend.interpreting())


def _fasttips_supports(s: Site) -> str | None:
    if s["device"] != "cuda" and not _backend.interpreting():
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    return unsupported(s)


def _base_bytes(s: Site) -> int:
    """Every implementation: the fp32 weight-normed prototypes (student and teacher), and with a
    gradient dz [S, d] and dW [K, d] in fp32."""
    K, d, S = s["K"], s["d"], s["S"]
    grads = 4 * (S * d + K * d) if s.mode == "fwd_bwd" else 0
    return 2 * 4 * K * d + grads + 64 * S


def _slab_bytes() -> int:
    try:
        from ..dino_loss import triton as module
        return int(getattr(module, "SLAB_BYTES", 256 * 2**20))
    except Exception:
        return 256 * 2**20


def _chunk_bytes() -> int:
    try:
        from ..dino_loss import chunked
        return int(chunked.CHUNK_BYTES)
    except Exception:
        return 256 * 2**20


def _reference_chunk_bytes() -> int:
    from ..dino_loss import reference
    return int(reference.DEFAULT_CHUNK_BYTES)


def working_bytes(name: str):
    def estimate(s: Site) -> int:
        base = _base_bytes(s)
        if name == "fasttips":
            return base
        if name == "fasttips-slab":
            return base + (_slab_bytes() if s.mode == "fwd_bwd" else 0)
        if name == "fasttips-chunked":
            return base + _chunk_bytes() + 4 * s["K"] * s["d"]
        if name == "reference":
            return base + _reference_chunk_bytes()
        return base + 2 * _reference_chunk_bytes()     # reference-compile: inductor keeps more buffers
    return estimate


def candidates() -> list[Candidate]:
    triton_missing = (lambda: None if _backend.triton_available() else "Triton does not import")
    out = [Candidate(name, "fasttips", _triton_path(path), unavailable=triton_missing,
                     supports=_fasttips_supports, working_bytes=working_bytes(name))
           for name, path in PATHS.items()]
    return out + [
        Candidate("reference", "pytorch", _reference, working_bytes=working_bytes("reference")),
        # inductor may pick other kernels from run to run: not admitted as deterministic
        Candidate("reference-compile", "pytorch", _reference_compile, deterministic=False,
                  supports=lambda s: None if s["device"] == "cuda" else "needs CUDA tensors",
                  working_bytes=working_bytes("reference-compile")),
    ]


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
class Timing:
    """Each candidate on detached copies of the call's own tensors (views: no memory), the gradients
    into fresh leaves, ``group`` dropped: a candidate timed on one rank must not wait on the others.
    In a distributed run Sinkhorn-Knopp's all-reduces would, so it is timed with softmax centering
    there (the same GEMMs and exponentials; the SK passes cost every candidate alike)."""

    def __init__(self, args, options: dict, chunk_bytes=None):
        self.args, self.chunk_bytes = args, chunk_bytes
        self.options = dict(options, group=None)
        import torch.distributed as dist
        if self.options.get("centering") == "sinkhorn_knopp" and dist.is_available() and dist.is_initialized():
            self.options["centering"] = "softmax"

    output_names = ("loss", "center statistic", "d student_z", "d student_v", "d student_g")

    def outputs(self, candidate: Candidate, s: Site) -> list[torch.Tensor]:
        """The loss, the center statistic and (training site) the student gradients (z, v, g)."""
        grad = s.mode == "fwd_bwd"
        args = [t.detach() for t in self.args]
        leaves = [args[i].requires_grad_() for i in range(3)] if grad else []
        with own_autograd(grad):
            loss, center_stat = candidate.run(*args, chunk_bytes=self.chunk_bytes, **self.options)
            return [loss, center_stat, *(torch.autograd.grad(loss, leaves) if grad else ())]

    def bench(self, candidate: Candidate, s: Site):
        grad = s.mode == "fwd_bwd"
        args = [t.detach() for t in self.args]
        leaves = [args[i].requires_grad_() for i in range(3)] if grad else []

        def run():
            with own_autograd(grad):
                loss, _ = candidate.run(*args, chunk_bytes=self.chunk_bytes, **self.options)
                if grad:
                    loss.backward()
                    for t in leaves:
                        t.grad = None
            return loss
        return run
