"""Hopper compile gate for the prototype cross-entropy kernels: every kernel at every launch configuration
in ``triton.CONFIGS``, plus the chunked path's row kernel at each of ``chunked.CONFIGS`` with and without
its gradient pass, compiled ahead of time for sm_90a (no GPU needed) and checked by ``hopper.py``.

The compiles use bf16 features at bottleneck d = 256 with the specialisation a real launch gets
(16-byte aligned pointers, strides and d divisible by 16; EVEN_K for K = 65536 / 131072). They run in
spawned worker processes with TRITON_INTERPRET=0: under the interpreter, the library's own
@triton.jit helpers (tl.sum, tl.zeros, ...) are interpreter objects the compiler cannot use.
"""
from __future__ import annotations

BOTTLENECK = 256
_FEATURE_POINTERS = ("zs_ptr", "zt_ptr", "ws_ptr", "wt_ptr", "z_ptr", "w_ptr", "ds_ptr",   # ds: the slab
                     "s_ptr", "u_ptr")                                                    # the chunked path's slabs
# Kernels without tl.dot (no HGMMA to require): the chunked path's row kernel, at both of its modes.
NO_MATMUL = ("_row_ce_kernel",)
ROW_KERNEL_MODES = (True, False)   # WRITE_GRAD: with a gradient (dS in place) and forward only


def cases() -> list[tuple[str, int]]:
    """(kernel, config index); the row kernel's index runs over configs × ROW_KERNEL_MODES."""
    from fasttips.kernels.dino_loss import chunked as C
    from fasttips.kernels.dino_loss import triton as T
    return ([(name, i) for name, configs in T.CONFIGS.items() for i in range(len(configs))]
            + [(C.ROW_KERNEL, i) for i in range(len(C.CONFIGS) * len(ROW_KERNEL_MODES))])


def signature(kernel) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name.startswith(("BLOCK", "K_TILES")) or name in ("PRECISION", "EVEN_K", "WRITE_GRAD", "ROWS"):
            sig[name] = "constexpr"
        elif name in _FEATURE_POINTERS:
            sig[name] = "*bf16"
        elif name == "pairs_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_case(case):
    from .hopper import compile_for_hopper

    from fasttips.kernels.dino_loss import triton as T
    from fasttips.kernels.triton_utils import constexprs_of
    name, index = case
    if name in NO_MATMUL:
        return _compile_row_kernel(index)
    kernel = T.KERNELS[name]
    cfg = T.CONFIGS[name][index]
    sig = signature(kernel)
    constexprs = dict(constexprs_of(cfg), BLOCK_D=BOTTLENECK, PRECISION="tf32")
    if name in T.EVEN_K_KERNELS:
        constexprs["EVEN_K"] = True
    aligned = tuple(a for a, t in sig.items()
                    if t.startswith("*") or a.startswith("stride") or a in ("D", "K_SPLIT"))
    return compile_for_hopper(kernel, sig, constexprs, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"], name=f"{name}{cfg}", divisible_by_16=aligned)


def _compile_row_kernel(index):
    from .hopper import compile_for_hopper

    from fasttips.kernels.dino_loss import chunked as C
    from fasttips.kernels.triton_utils import constexprs_of
    cfg = C.CONFIGS[index // len(ROW_KERNEL_MODES)]
    write_grad = ROW_KERNEL_MODES[index % len(ROW_KERNEL_MODES)]
    kernel = C.K.row_ce_kernel
    sig = signature(kernel)
    constexprs = dict(constexprs_of(cfg), WRITE_GRAD=write_grad, EVEN_K=True)
    aligned = tuple(a for a, t in sig.items() if t.startswith("*") or a.startswith("stride") or a == "K")
    return compile_for_hopper(kernel, sig, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                              name=f"{C.ROW_KERNEL}{cfg}-write_grad={write_grad}", divisible_by_16=aligned)


def compile_all(workers: int | None = None) -> dict:
    """{case: HopperReport, or the exception its compile raised}."""
    from .hopper import compile_in_workers
    return compile_in_workers(compile_case, cases(), workers)
