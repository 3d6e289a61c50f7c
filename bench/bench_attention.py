"""Attention at ViT-g shapes: every fasttips attention path (``VARIANTS``) vs every peer, in one run.

Cases (d = 64, bf16): batch·heads = 64×24 at N = 257 and N = 1025, 256×24 at N = 50 (``--seqlens``
picks other lengths: 256 × 24 heads up to 64 tokens, 64 × 24 above); forward and forward+backward.
fasttips rows are named by variant (kernels/attention/triton.py ``VARIANTS``: "fasttips" is the
pointer forward with the two-pass backward, "fasttips-tma" / "fasttips-ws" the TMA and
warp-specialised forwards with the one-pass backward, ...). Peers: SDPA with each backend forced
(flash, efficient, cudnn, math), the default SDPA choice, FlexAttention (compiled) and flash-attn /
xformers when importable. Then the multi-crop layer: 2 global (257) + 8 local (50) crops per image,
one packed ``attention_varlen`` launch per variant vs one dense launch per crop size (fasttips, the
SDPA backend fastest at 257 for both sizes, and the fastest SDPA backend for each size).
``--graph`` adds CUDA-graph replays of the fasttips and SDPA rows ("+graph"): launch cost apart.

Useful FLOPs follow the FA convention (fwd 4·N²·d per head, bwd 2.5× fwd); bytes are the minimal
HBM traffic of docs/kernels.md. Targets (issue 27, ratios in one run, H100): fwd+bwd ≥ 1.3× cuDNN at
N = 257, ≥ 1.0× cuDNN at N = 1025, ≥ 1.0× SDPA-efficient at N = 50; multi-crop ≥ 1.25× the best
SDPA backend per size.

    python bench/bench_attention.py [--quick] [--no-flex] [--seqlens 257,1025,50] [--graph]
        [--variants fasttips,fasttips-ws]
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import Bench, attention_flops, attention_varlen_flops  # noqa: E402

import fasttips.kernels as ops  # noqa: E402
from fasttips.kernels.attention import triton as attn_triton  # noqa: E402

BASELINE = "sdpa-default"   # what `F.scaled_dot_product_attention` picks by itself
DENSE_CASES = [(64, 24, 257), (64, 24, 1025), (256, 24, 50)]  # (B, H, N) at d = 64
# the targets: (N, the peer, the least ratio peer_ms / ours) for fwd+bwd
TARGETS = [(257, "sdpa-cudnn", 1.3), (1025, "sdpa-cudnn", 1.0), (50, "sdpa-efficient", 1.0)]
MULTICROP_TARGET = 1.25   # fasttips multi-crop fwd+bwd vs the fastest SDPA backend per crop size
D = 64
MULTICROP = dict(images=32, H=24, n_global=2, n_local=8, N_global=257, N_local=50)
MULTICROP_CPU = dict(images=2, H=2, n_global=2, n_local=4, N_global=65, N_local=17)  # CPU smoke pass


def attention_bytes(B, H, N, D, mode, elem=2):
    """Minimal HBM bytes (docs/kernels.md): fwd reads q, k, v and writes out + LSE; bwd reads
    q, k, v, out, dout, LSE and writes dq, dk, dv."""
    heads = B * H
    fwd = heads * (4 * N * D * elem + 4 * N)
    bwd = heads * (8 * N * D * elem + 8 * N)
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}[mode]


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(backend)

    def fn(q, k, v):
        if chosen is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _flex():
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v)


def _flash_attn():
    from flash_attn import flash_attn_func  # [B, N, H, D] layout
    return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2)).transpose(1, 2)


def _xformers():
    from xformers.ops import memory_efficient_attention  # [B, N, H, D] layout
    return lambda q, k, v: memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)


def _variant(kwargs):
    return lambda q, k, v: attn_triton.attention(q, k, v, **kwargs)


def default_variant() -> str:
    """The VARIANTS entry that a call without path arguments takes."""
    default = dict(forward=attn_triton.DEFAULT_FORWARD, backward=attn_triton.DEFAULT_BACKWARD)
    return next(name for name, kwargs in attn_triton.VARIANTS.items() if kwargs == default)


def implementations(flex: bool, variants=None):
    impls = {name: _variant(kwargs) for name, kwargs in attn_triton.VARIANTS.items()
             if variants is None or name in variants}
    for name in ("flash", "efficient", "cudnn", "math", "default"):
        impls[f"sdpa-{name}"] = _sdpa(name)
    optional = [("flash-attn", _flash_attn), ("xformers", _xformers)]
    if flex:
        optional.insert(0, ("flex", _flex))
    for name, make in optional:
        try:
            impls[name] = make()
        except Exception as exc:  # not installed / not importable: say so, keep going
            print(f"[skip] {name}: {type(exc).__name__}: {exc}", flush=True)
    return impls


def _graphed(fn, args):
    """``fn(*args)`` captured once into a CUDA graph (after warm-up calls on a side stream, which also
    finish any autotuning); the replay callable. Launch cost apart from kernel time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def _fwd_bwd(fn):
    def run(q, k, v, dout):
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)
    return run


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def bench_dense(bench: Bench, impls: dict, B: int, H: int, N: int, device, n_inputs: int = 2,
                graph: bool = False):
    sets = [[torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3)] for _ in range(n_inputs)]
    douts = [torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(n_inputs)]
    ref = ops.attention(*sets[0], backend="reference")
    for mode in ("fwd", "fwd_bwd"):
        case = {"B": B, "H": H, "N": N, "D": D, "dtype": "bf16", "mode": mode}
        flops = attention_flops(B, H, N, D, mode)
        nbytes = attention_bytes(B, H, N, D, mode)
        for name, fn in impls.items():
            try:
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    if mode == "fwd":
                        err = _max_err(fn(*sets[0]), ref)
                        call, inputs = fn, sets
                    else:
                        err = None
                        call, inputs = _fwd_bwd(fn), [(*s, d) for s, d in zip(sets, douts)]
                    bench.add(case=case, impl=name, timing=bench.time(call, inputs=inputs), flops=flops,
                              bytes=nbytes, max_abs_err_vs_ref=err)
                    if graph and (name.startswith("fasttips") or name.startswith("sdpa-")) and name != "sdpa-math":
                        replay = _graphed(call, inputs[0])
                        bench.add(case=case, impl=f"{name}+graph", timing=bench.time(replay), flops=flops,
                                  bytes=nbytes)
            except Exception as exc:
                print(f"[fail] {name} {case}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None


def bench_multicrop(bench: Bench, sdpa_backend: str, device, m: dict = MULTICROP, variants=None,
                    sdpa_per_size: tuple[str, str] | None = None):
    """One packed varlen launch for all crops vs one launch per crop size (dense layouts).

    ``variants``: fasttips variants to run packed (None: the op's own choice, as the CPU smoke pass
    runs it); the first two also run per size. ``sdpa_per_size``: the SDPA backends fastest at the
    global and at the local crop size (a row with each size on its own best backend)."""
    H = m["H"]
    on_gpu = device.type == "cuda"
    backend = "triton" if on_gpu else None        # on CPU: the op's own dispatch (its reference)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    n_g, n_l = m["images"] * m["n_global"], m["images"] * m["n_local"]
    lengths = [m["N_global"]] * n_g + [m["N_local"]] * n_l
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    T, split = int(cu[-1]), n_g * m["N_global"]
    # Every variant takes the packed [T, H, D] tensors a ViT's qkv projection gives for the
    # concatenated crops; the per-size variants take free [B, H, N, D] views of them.
    sets = [[torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True)
             for _ in range(3)] for _ in range(2)]
    douts = [torch.randn(T, H, D, device=device, dtype=dtype) for _ in range(2)]

    def varlen(kwargs=None):
        if kwargs is None:
            return lambda q, k, v: ops.attention_varlen(q, k, v, cu, max_seqlen=m["N_global"], backend=backend)
        return lambda q, k, v: attn_triton.attention_varlen(q, k, v, cu, max_seqlen=m["N_global"], **kwargs)

    def per_size(attn_global, attn_local=None):
        attn_local = attn_local or attn_global

        def views(t):
            return (t[:split].unflatten(0, (n_g, m["N_global"])).transpose(1, 2),
                    t[split:].unflatten(0, (n_l, m["N_local"])).transpose(1, 2))

        def fn(q, k, v):
            (qg, ql), (kg, kl), (vg, vl) = views(q), views(k), views(v)
            og, ol = attn_global(qg, kg, vg), attn_local(ql, kl, vl)
            return torch.cat([og.transpose(1, 2).flatten(0, 1), ol.transpose(1, 2).flatten(0, 1)])
        return fn

    if variants is None:
        runs = {"fasttips-varlen-1-launch": varlen(),
                "fasttips-per-size-2-launches": per_size(lambda q, k, v: ops.attention(q, k, v, backend=backend))}
    else:
        runs = {f"{name}-varlen-1-launch": varlen(attn_triton.VARIANTS[name]) for name in variants}
        runs.update({f"{name}-per-size-2-launches": per_size(_variant(attn_triton.VARIANTS[name]))
                     for name in variants[:2]})
    runs[f"sdpa-{sdpa_backend}-per-size"] = per_size(_sdpa(sdpa_backend))
    if sdpa_per_size:
        runs["sdpa-best-per-size"] = per_size(_sdpa(sdpa_per_size[0]), _sdpa(sdpa_per_size[1]))
    flops_fwd = attention_varlen_flops(lengths, H, D, "fwd")
    for mode in ("fwd", "fwd_bwd"):
        case = {"layer": "multicrop", "images": m["images"], "global": f"{n_g}x{m['N_global']}",
                "local": f"{n_l}x{m['N_local']}", "H": H, "D": D, "dtype": "bf16" if on_gpu else "fp32",
                "mode": mode}
        flops = flops_fwd * (3.5 if mode == "fwd_bwd" else 1.0)
        for name, fn in runs.items():
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        timing = bench.time(fn, inputs=sets)
                else:
                    timing = bench.time(_fwd_bwd(fn), inputs=[(*s, d) for s, d in zip(sets, douts)])
                extra = {"sdpa_per_size": list(sdpa_per_size)} if name == "sdpa-best-per-size" else {}
                bench.add(case=case, impl=name, timing=timing, flops=flops, **extra)
            except Exception as exc:
                print(f"[fail] {name} {case}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def fastest_sdpa(bench: Bench, B, H, N, mode) -> tuple[str, float] | None:
    rows = [r for r in bench.rows if r["case"].get("N") == N and r["case"].get("B") == B
            and r["case"].get("mode") == mode and r["impl"].startswith("sdpa-") and not r["impl"].endswith("+graph")]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["ms"])
    return best["impl"], best["ms"]


def _batch(N: int) -> int:
    return 256 if N <= 64 else 64


def run(quick: bool, flex: bool = True, results_dir: str | None = None, seqlens=None, graph: bool = False,
        variants=None) -> Bench:
    bench = Bench("attention", quick=quick, results_dir=results_dir)
    device = bench.device
    if device.type != "cuda":
        print("no CUDA device: running a tiny CPU smoke pass (reference backend only); skipped, they "
              "need CUDA: the fasttips variants (" + ", ".join(attn_triton.VARIANTS) + "), sdpa-flash, "
              "sdpa-efficient, sdpa-cudnn, flex, flash-attn, xformers", flush=True)
        impls = {"fasttips": lambda q, k, v: ops.attention(q, k, v), "sdpa-default": _sdpa("default")}
        bench_dense(bench, impls, 2, 2, 50, device, n_inputs=1)
        bench_multicrop(bench, "default", device, MULTICROP_CPU)
        return bench
    impls = implementations(flex, variants)
    cases = DENSE_CASES if not seqlens else [(_batch(N), 24, N) for N in seqlens]
    for B, H, N in cases:
        print(f"-- dense B={B} H={H} N={N}", flush=True)
        bench_dense(bench, impls, B, H, N, device, graph=graph)
    best = fastest_sdpa(bench, 64, 24, 257, "fwd_bwd")
    per_size = (fastest_sdpa(bench, 64, 24, 257, "fwd_bwd"), fastest_sdpa(bench, 256, 24, 50, "fwd_bwd"))
    print("-- multicrop", flush=True)
    names = [n for n in attn_triton.VARIANTS if variants is None or n in variants]
    names.sort(key=lambda n: n != default_variant())       # the default first: it also runs per size
    try:
        bench_multicrop(bench, best[0].removeprefix("sdpa-") if best else "default", device, variants=names,
                        sdpa_per_size=tuple(p[0].removeprefix("sdpa-") for p in per_size) if all(per_size) else None)
    except Exception:
        traceback.print_exc()
    return bench


def summary(bench: Bench) -> str:
    """The issue's targets, measured, for every fasttips variant."""
    lines = ["== targets (issue 27: fwd+bwd vs the named peer, ratio = peer ms / ours) =="]
    for N, peer, need in TARGETS:
        B = _batch(N)
        rows = {r["impl"]: r for r in bench.rows if r["case"].get("N") == N and r["case"].get("B") == B
                and r["case"].get("mode") == "fwd_bwd"}
        if peer not in rows:
            continue
        for name, r in sorted(rows.items()):
            if name.startswith("fasttips") and not name.endswith("+graph"):
                ratio = rows[peer]["ms"] / r["ms"]
                lines.append(f"N={N} fwd+bwd {name}: {r['ms']:.3f} ms vs {peer} {rows[peer]['ms']:.3f} ms → "
                             f"{ratio:.2f}× (target ≥ {need}×: {'met' if ratio >= need else 'NOT met'})")
    crop = {r["impl"]: r for r in bench.rows if r["case"].get("layer") == "multicrop"
            and r["case"].get("mode") == "fwd_bwd"}
    if "sdpa-best-per-size" in crop:
        peer = crop["sdpa-best-per-size"]["ms"]
        for name, r in sorted(crop.items()):
            if name.startswith("fasttips"):
                ratio = peer / r["ms"]
                lines.append(f"multicrop fwd+bwd {name}: {r['ms']:.3f} ms vs sdpa-best-per-size {peer:.3f} ms → "
                             f"{ratio:.2f}× (target ≥ {MULTICROP_TARGET}×: "
                             f"{'met' if ratio >= MULTICROP_TARGET else 'NOT met'})")
    out = "\n".join(lines)
    print(out, flush=True)
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--seqlens must be positive integers separated by commas, got {text!r}")
    return values


def _variant_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in attn_triton.VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {list(attn_triton.VARIANTS)}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timing windows")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    parser.add_argument("--seqlens", type=_int_list, default=None,
                        help="dense sequence lengths, comma-separated (default 257,1025,50)")
    parser.add_argument("--graph", action="store_true",
                        help="also time CUDA-graph replays of the fasttips and SDPA rows (impl name + '+graph')")
    parser.add_argument("--variants", type=_variant_list, default=None,
                        help="fasttips variants to time, comma-separated (default all: "
                             f"{','.join(attn_triton.VARIANTS)})")
    args = parser.parse_args()
    bench = run(args.quick, flex=not args.no_flex, seqlens=args.seqlens, graph=args.graph, variants=args.variants)
    bench.report(baseline=BASELINE)
    summary(bench)
    print("wrote", bench.write(), flush=True)


if __name__ == "__main__":
    main()
