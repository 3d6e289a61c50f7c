"""Candidates of ``attention`` (dense [B, H, N, D], optional key padding) and ``attention_varlen``
(packed [T, H, D] + ``cu_seqlens``), their sites, and how each is timed.

Dense, in timing order (names as in bench/results rows):
  sdpa-cudnn, sdpa-flash, sdpa-efficient   SDPA with one backend forced (``sdpa_kernel``)
  <each fasttips variant>                  ``kernels/attention/triton.py: VARIANTS`` (default {"fasttips": {}})
  flash-attn, flash-attn3, xformers        when importable (flash-attn 2, its Hopper build, xformers)
  sdpa-math                                SDPA's math backend (deterministic; never fast on a GPU)
  reference, sdpa-default                  not timed: the forced reference, and SDPA's own choice
                                           (``kernels.dispatch=pytorch``)
Varlen:
  <each fasttips variant>                  the packed kernel, one launch
  per-size                                 each run of equal-length segments as one dense call to
                                           that run's own dense decision (a view per run, no copy in)
  flash-attn, torch-varlen, xformers       flash_attn_varlen_func, torch.nn.attention.varlen, a
                                           block-diagonal mask (when importable)
  reference                                not timed
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from .. import _backend
from .site import Candidate, Site, dtype_name, size_class
from .timing import own_autograd

DEFAULT_VARIANTS = {"fasttips": {}}
# Variants whose backward is deterministic (no atomics). Others are treated as not deterministic unless
# triton.py lists them in DETERMINISTIC_VARIANTS.
DETERMINISTIC_DEFAULT = ("fasttips",)


# --------------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------------
def _mode(*tensors) -> str:
    return "fwd_bwd" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "fwd"


def dense_fields(device: str, dtype: str, B: int, H: int, N: int, D: int, mask: bool) -> tuple:
    return (("device", device), ("dtype", dtype), ("B", size_class(B)), ("H", int(H)), ("N", int(N)),
            ("D", int(D)), ("mask", bool(mask)))


def dense_site(q, k, v, key_padding_mask=None) -> Site:
    B, H, N, D = q.shape
    return Site("attention", _mode(q, k, v),
                dense_fields(q.device.type, dtype_name(q.dtype), B, H, N, D, key_padding_mask is not None))


def varlen_fields(device: str, dtype: str, H: int, D: int, runs, segments: int | None) -> tuple:
    """``runs``: ((count, length), ...) of the equal-length segment runs in order, or None when unknown
    (then only candidates that read ``cu_seqlens`` on the device can run, and ``segments`` counts them)."""
    classed = None if runs is None else tuple((size_class(c), int(n)) for c, n in runs)
    return (("device", device), ("dtype", dtype), ("H", int(H)), ("D", int(D)), ("runs", classed),
            ("segments", None if runs is not None else segments))


def varlen_site(q, k, v, cu_seqlens, max_seqlen, runs) -> Site:
    T, H, D = q.shape
    return Site("attention_varlen", _mode(q, k, v),
                varlen_fields(q.device.type, dtype_name(q.dtype), H, D, runs, int(cu_seqlens.shape[0]) - 1))


def runs_of(lengths) -> tuple:
    """Lengths [257, 257, 50, 50, 50] → ((2, 257), (3, 50)): consecutive equal lengths as one run."""
    runs = []
    for n in lengths:
        n = int(n)
        if runs and runs[-1][1] == n:
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return tuple((c, n) for c, n in runs)


# --------------------------------------------------------------------------------------------------
# implementations (the op's own signature: dense (q, k, v, key_padding_mask, scale);
# varlen (q, k, v, cu_seqlens, max_seqlen, scale, runs))
# --------------------------------------------------------------------------------------------------
def _triton_module():
    from ..attention import triton as module
    return module


def variants() -> dict:
    """fasttips attention variant name → keyword arguments of triton.attention / attention_varlen."""
    if not _backend.triton_available():
        return dict(DEFAULT_VARIANTS)
    return dict(getattr(_triton_module(), "VARIANTS", DEFAULT_VARIANTS))


def _deterministic_variants() -> tuple:
    if not _backend.triton_available():
        return DETERMINISTIC_DEFAULT
    return tuple(getattr(_triton_module(), "DETERMINISTIC_VARIANTS", DETERMINISTIC_DEFAULT))


def _fasttips_dense(variant: str):
    def run(q, k, v, key_padding_mask=None, scale=None):
        module = _triton_module()
        return module.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale,
                                **getattr(module, "VARIANTS", DEFAULT_VARIANTS)[variant])
    return run


def _fasttips_varlen(variant: str):
    def run(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
        module = _triton_module()
        return module.attention_varlen(q, k, v, cu_seqlens, max_seqlen=max_seqlen, scale=scale,
                                       **getattr(module, "VARIANTS", DEFAULT_VARIANTS)[variant])
    return run


def _reference_dense(q, k, v, key_padding_mask=None, scale=None):
    from ..attention import reference
    return reference.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale)


def _reference_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
    from ..attention import reference
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen=max_seqlen, scale=scale)


_SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def _sdpa(backend: str | None):
    """SDPA with one backend forced, or (None) SDPA's own choice. The key padding mask becomes SDPA's
    boolean keep-mask. (A sequence whose keys are all padding has no defined output: the reference
    gives 0 there, SDPA NaN; no caller of fasttips passes one.)"""
    def run(q, k, v, key_padding_mask=None, scale=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return run


def _flash_attn_dense(q, k, v, key_padding_mask=None, scale=None):
    from flash_attn import flash_attn_func          # [B, N, H, D] layout
    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           softmax_scale=scale).transpose(1, 2)


def _flash_attn3_dense(q, k, v, key_padding_mask=None, scale=None):
    from flash_attn_interface import flash_attn_func   # the Hopper build (FlashAttention-3)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)


def _xformers_dense(q, k, v, key_padding_mask=None, scale=None):
    from xformers.ops import memory_efficient_attention   # [B, N, H, D] layout
    return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      scale=scale).transpose(1, 2)


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
    from flash_attn import flash_attn_varlen_func
    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
    from torch.nn.attention.varlen import varlen_attn
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)


def _xformers_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
    from xformers.ops import fmha, memory_efficient_attention
    lengths = [n for count, n in runs for _ in range(count)]
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lengths)
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


def per_size(q, k, v, cu_seqlens, max_seqlen=None, scale=None, runs=None, dense=None):
    """Each run of equal-length segments as one dense call to ``dense`` (``fasttips.kernels.attention``,
    which runs that run's own decision: the best dense candidate for its count × length); the inputs
    are views of the packed tensors, the outputs concatenated."""
    outs, start = [], 0
    for count, length in runs:
        end = start + count * length
        if end > start:
            views = [t[start:end].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v)]
            outs.append(dense(*views, scale=scale).transpose(1, 2).flatten(0, 1))
        start = end
    if not outs:
        return torch.empty_like(q)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------------------------------
# availability and support rules
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _missing(module: str) -> str | None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not installed"


def _needs(module: str):
    return lambda: _missing(module)


def _triton_unavailable() -> str | None:
    return None if _backend.triton_available() else "Triton does not import"


def _on_cuda(site: Site) -> str | None:
    return None if site["device"] == "cuda" else "needs CUDA tensors"


def _fasttips_supports(site: Site) -> str | None:
    if site["device"] != "cuda" and not _backend.interpreting():
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    if site["D"] > 128:
        return f"head dim D={site['D']} > 128"
    return None


def _half(site: Site) -> str | None:
    return _on_cuda(site) or (None if site["dtype"] in ("bf16", "fp16") else f"takes bf16/fp16, not {site['dtype']}")


def _no_mask(site: Site) -> str | None:
    return "no key padding mask" if site.get("mask") else None


def _sdpa_supports(backend: str):
    def supports(site: Site) -> str | None:
        if backend in ("cudnn", "efficient") and site["device"] != "cuda":
            return "needs CUDA tensors"
        if backend in ("cudnn", "flash") and site["device"] == "cuda" and site["dtype"] not in ("bf16", "fp16"):
            return f"takes bf16/fp16, not {site['dtype']}"
        if backend == "flash" and site.get("mask"):
            return "no key padding mask"
        return None
    return supports


def _needs_runs(site: Site) -> str | None:
    return None if site["runs"] is not None else "needs the segment lengths on the host (pass runs=)"


def dense_candidates() -> list[Candidate]:
    det = _deterministic_variants()
    fasttips = [Candidate(name, "fasttips", _fasttips_dense(name), unavailable=_triton_unavailable,
                          supports=_fasttips_supports, deterministic=name in det) for name in variants()]
    return [
        Candidate("sdpa-cudnn", "pytorch", _sdpa("cudnn"), supports=_sdpa_supports("cudnn"), deterministic=False),
        Candidate("sdpa-flash", "pytorch", _sdpa("flash"), supports=_sdpa_supports("flash"), deterministic=False),
        Candidate("sdpa-efficient", "pytorch", _sdpa("efficient"), supports=_sdpa_supports("efficient"),
                  deterministic=False),
        *fasttips,
        Candidate("flash-attn", "external", _flash_attn_dense, unavailable=_needs("flash_attn"),
                  supports=lambda s: _half(s) or _no_mask(s), deterministic=False),
        Candidate("flash-attn3", "external", _flash_attn3_dense, unavailable=_needs("flash_attn_interface"),
                  supports=lambda s: _half(s) or _no_mask(s), deterministic=False),
        Candidate("xformers", "external", _xformers_dense, unavailable=_needs("xformers"),
                  supports=lambda s: _on_cuda(s) or _no_mask(s), deterministic=False),
        Candidate("sdpa-math", "pytorch", _sdpa("math")),
        Candidate("reference", "pytorch", _reference_dense, timed=False),
        Candidate("sdpa-default", "pytorch", _sdpa(None), timed=False, deterministic=False),
    ]


def _prepare_per_size(site: Site, timing) -> None:
    timing.decide_parts()


def varlen_candidates() -> list[Candidate]:
    det = _deterministic_variants()
    fasttips = [Candidate(name, "fasttips", _fasttips_varlen(name), unavailable=_triton_unavailable,
                          supports=_fasttips_supports, deterministic=name in det) for name in variants()]
    return [
        *fasttips,
        # deterministic when its parts are: checked part by part (timing.decide_parts)
        Candidate("per-size", "pytorch", per_size, supports=_needs_runs, prepare=_prepare_per_size),
        Candidate("flash-attn", "external", _flash_attn_varlen, unavailable=_needs("flash_attn"),
                  supports=_half, deterministic=False),
        Candidate("torch-varlen", "pytorch", _torch_varlen, unavailable=_needs("torch.nn.attention.varlen"),
                  supports=_half, deterministic=False),
        Candidate("xformers", "external", _xformers_varlen, unavailable=_needs("xformers"),
                  supports=lambda s: _on_cuda(s) or _needs_runs(s), deterministic=False),
        Candidate("reference", "pytorch", _reference_varlen, timed=False),
    ]


# --------------------------------------------------------------------------------------------------
# timing: each candidate on detached views of the call's own tensors (no copy of the inputs, the
# caller's autograd graph untouched), forward only or forward + backward as the site's mode says
# --------------------------------------------------------------------------------------------------
def _leaves(tensors, grad: bool):
    return [t.detach().requires_grad_() if grad else t.detach() for t in tensors]


def _bench(call, tensors, grad: bool):
    """A zero-argument function running ``call(*leaves)`` (and its backward when ``grad``)."""
    leaves = _leaves(tensors, grad)
    douts = []

    def run():
        with own_autograd(grad):
            out = call(*leaves)
            if not grad:
                return out
            if not douts:
                douts.append(torch.randn_like(out))
            return torch.autograd.grad(out, leaves, douts[0])
    return run


def _outputs(call, tensors, grad: bool) -> list[torch.Tensor]:
    """What dispatch checks before it times a candidate: the output of ``call(*leaves)`` and, when
    ``grad``, the gradients of the leaves for a fixed random output gradient (the same for every
    candidate of a site)."""
    leaves = _leaves(tensors, grad)
    with own_autograd(grad):
        out = call(*leaves)
        if not grad:
            return [out]
        seed = torch.Generator(device=out.device).manual_seed(0)
        dout = torch.randn(out.shape, generator=seed, device=out.device, dtype=out.dtype)
        return [out, *torch.autograd.grad(out, leaves, dout)]


class DenseTiming:
    output_names = ("output", "dq", "dk", "dv")

    def __init__(self, q, k, v, key_padding_mask=None, scale=None):
        self.qkv, self.mask, self.scale = (q, k, v), key_padding_mask, scale

    def bench(self, candidate: Candidate, site: Site):
        return _bench(lambda q, k, v: candidate.run(q, k, v, self.mask, self.scale), self.qkv,
                      site.mode == "fwd_bwd")

    def outputs(self, candidate: Candidate, site: Site) -> list[torch.Tensor]:
        return _outputs(lambda q, k, v: candidate.run(q, k, v, self.mask, self.scale), self.qkv,
                        site.mode == "fwd_bwd")


class VarlenTiming:
    """``dense``: the public dense op, which the per-size composition calls per run."""
    output_names = DenseTiming.output_names

    def __init__(self, q, k, v, cu_seqlens, max_seqlen, scale, runs, site: Site, dense):
        self.qkv, self.cu, self.max_seqlen, self.scale, self.runs = (q, k, v), cu_seqlens, max_seqlen, scale, runs
        self.site, self.dense = site, dense

    def _call(self, candidate: Candidate):
        return lambda q, k, v: candidate.run(q, k, v, self.cu, self.max_seqlen, self.scale, self.runs, self.dense)

    def bench(self, candidate: Candidate, site: Site):
        return _bench(self._call(candidate), self.qkv, site.mode == "fwd_bwd")

    def outputs(self, candidate: Candidate, site: Site) -> list[torch.Tensor]:
        return _outputs(self._call(candidate), self.qkv, site.mode == "fwd_bwd")

    def decide_parts(self) -> None:
        """Decide every run's dense site (timed now if new) before the composition is timed: one call
        of the dense op per run, on views, in the varlen site's mode (its backward is not needed)."""
        grad = self.site.mode == "fwd_bwd"
        start = 0
        for count, length in self.runs:
            end = start + count * length
            if end > start:
                views = [t.detach()[start:end].unflatten(0, (count, length)).transpose(1, 2) for t in self.qkv]
                with own_autograd(grad):
                    self.dense(*_leaves(views, grad), scale=self.scale)
            start = end


def part_site(varlen: Site, count: int, length: int) -> Site:
    """The dense site of one run of a varlen site (no mask; the varlen site's mode and dtype)."""
    return Site("attention", varlen.mode, dense_fields(varlen["device"], varlen["dtype"], count, varlen["H"],
                                                       length, varlen["D"], False))
