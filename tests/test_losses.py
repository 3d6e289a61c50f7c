"""Every loss against an independent, naive formula written here (loops, no shared code).

The DINO/iBOT prototype cross-entropy runs through ``fasttips.kernels.prototype_cross_entropy``,
whose contract computes in fp32; their fp64 cases are therefore checked at fp32 tolerance.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from fasttips.losses import (Centering, clip_loss, contrastive_loss, dino_loss, ibot_loss, ibot_rows,
                             koleo_loss, siglip_loss)
from tooling.numerics import TOLERANCES

DTYPES = [torch.float32, torch.float64]


def close(a, b, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(a.to(b.dtype), b, atol=atol * scale, rtol=rtol * scale)


def proto_tol(dtype):
    # the prototype CE op computes in fp32 whatever the input dtype
    return torch.float32


# ------------------------------------------------------------------------------------------------
# naive formulas
# ------------------------------------------------------------------------------------------------
def unit_rows(n, d, dtype):
    return F.normalize(torch.randn(n, d, dtype=dtype), dim=-1)


def prototypes(K, d, dtype, grad=False):
    v = torch.randn(K, d, dtype=dtype, requires_grad=grad)
    g = (1.0 + 0.1 * torch.rand(K, dtype=dtype)).requires_grad_(grad)
    return v, g


def naive_logits(z, v, g):
    out = torch.empty(z.shape[0], v.shape[0], dtype=torch.float64)
    for k in range(v.shape[0]):
        w = g[k].double() * v[k].double() / torch.sqrt((v[k].double() ** 2).sum())
        out[:, k] = z.double() @ w
    return out


def naive_targets_softmax(zt, vt, gt, center, tau_t):
    logits = naive_logits(zt, vt, gt)
    e = torch.exp((logits - center.double()) / tau_t)
    return e / e.sum(dim=1, keepdim=True), logits.mean(dim=0)


def naive_sinkhorn(zt, vt, gt, tau_t, iters=3):
    """DINOv2 SK written on rows × K (instead of the transposed form)."""
    P = torch.exp(naive_logits(zt, vt, gt) / tau_t)
    R, K = P.shape
    P = P / P.sum()
    for _ in range(iters):
        P = P / P.sum(dim=0, keepdim=True) / K      # each prototype gets mass 1/K
        P = P / P.sum(dim=1, keepdim=True) / R      # each row gets mass 1/R
    return P * R


def naive_ce(p_row, zs_row, vs, gs, tau_s):
    logits = naive_logits(zs_row[None], vs, gs)[0] / tau_s
    logp = logits - torch.logsumexp(logits, dim=0)
    return -(p_row * logp).sum()


# ------------------------------------------------------------------------------------------------
# DINO
# ------------------------------------------------------------------------------------------------
def naive_dino(s_local, s_global, t_global, student, teacher, G, B, center, tau_s, tau_t, sk=False):
    if sk:
        p = naive_sinkhorn(t_global, *teacher, tau_t)
    else:
        p, _ = naive_targets_softmax(t_global, *teacher, center, tau_t)
    L = s_local.shape[0] // B
    terms = []
    for loc in range(L):
        for g in range(G):
            terms.append(sum(naive_ce(p[g * B + b], s_local[loc * B + b], *student, tau_s)
                             for b in range(B)) / B)
    if G == 2:
        for gs, gt in ((0, 1), (1, 0)):
            terms.append(sum(naive_ce(p[gt * B + b], s_global[gs * B + b], *student, tau_s)
                             for b in range(B)) / B)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,L,centering", [(1, 1, "softmax"), (1, 7, "softmax"), (2, 1, "softmax"),
                                           (2, 3, "sinkhorn_knopp"), (1, 2, "sinkhorn_knopp")])
def test_dino_matches_naive(seed, dtype, G, L, centering):
    B, d, K = 3, 5, 37                                   # K not a power of two
    tau_s, tau_t = 0.1, 0.05
    s_local = unit_rows(L * B, d, dtype).requires_grad_()
    s_global = unit_rows(G * B, d, dtype).requires_grad_() if G > 1 else None
    t_global = unit_rows(G * B, d, dtype)
    student, teacher = prototypes(K, d, dtype, grad=True), prototypes(K, d, dtype)
    center = 0.3 * torch.randn(K, dtype=dtype)

    loss, stat = dino_loss(s_local, t_global, student, teacher, n_global=G, student_global=s_global,
                           center=center, student_temp=tau_s, teacher_temp=tau_t, centering=centering)
    want = naive_dino(s_local, s_global, t_global, student, teacher, G, B, center, tau_s, tau_t,
                      sk=centering == "sinkhorn_knopp")
    tol = proto_tol(dtype)
    close(loss, want.to(loss.dtype), tol)
    close(stat, naive_logits(t_global, *teacher).mean(dim=0).to(stat.dtype), tol)

    inputs = [s_local, *student] + ([s_global] if s_global is not None else [])
    got = torch.autograd.grad(loss, inputs)
    ref = torch.autograd.grad(want, inputs)
    for a, b in zip(got, ref):
        close(a, b, tol, scale=10)


def test_dino_without_terms_is_zero(seed):
    d, K = 4, 9
    loss, stat = dino_loss(unit_rows(0, d, torch.float32), unit_rows(3, d, torch.float32),
                           prototypes(K, d, torch.float32), prototypes(K, d, torch.float32), n_global=1)
    assert loss.item() == 0.0 and stat is None


def test_dino_bad_shapes():
    d, K = 4, 9
    f = torch.float32
    p = prototypes(K, d, f)
    with pytest.raises(ValueError, match="student_local"):
        dino_loss(unit_rows(5, d, f), unit_rows(3, d, f), p, p, n_global=1)
    with pytest.raises(ValueError, match="n_global"):
        dino_loss(unit_rows(6, d, f), unit_rows(3, d, f), p, p, n_global=2)
    with pytest.raises(ValueError, match="student_global is required"):
        dino_loss(unit_rows(4, d, f), unit_rows(4, d, f), p, p, n_global=2)
    with pytest.raises(ValueError, match="teacher_prototypes"):
        dino_loss(unit_rows(6, d, f), unit_rows(3, d, f), p, prototypes(K, d + 1, f), n_global=1)
    with pytest.raises(ValueError, match="last dim"):
        dino_loss(unit_rows(6, d + 1, f), unit_rows(3, d, f), p, p, n_global=1)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp marginals (the op's SK, checked against the definition)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("R,K", [(7, 37), (40, 11)])
def test_sinkhorn_marginals_after_last_iteration(seed, R, K):
    from fasttips.kernels.dino_loss.naive import sinkhorn_knopp
    logits = torch.randn(R, K)
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3).double()
    # the last step normalises rows exactly: each row is a distribution
    torch.testing.assert_close(q.sum(dim=1), torch.ones(R, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    # it matches the definition, written here on rows × K
    torch.testing.assert_close(q, naive_sinkhorn_from_logits(logits.double(), 0.5, 3), atol=1e-5, rtol=1e-4)
    # run to convergence, both marginals hold: every prototype gets mass R/K
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=30).double()
    torch.testing.assert_close(q.sum(dim=0), torch.full((K,), R / K, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def naive_sinkhorn_from_logits(logits, tau, iters):
    P = torch.exp(logits / tau)
    R, K = P.shape
    P = P / P.sum()
    for _ in range(iters):
        P = P / P.sum(dim=0, keepdim=True) / K
        P = P / P.sum(dim=1, keepdim=True) / R
    return P * R


# ------------------------------------------------------------------------------------------------
# iBOT / iBOT++
# ------------------------------------------------------------------------------------------------
def naive_ibot(s, t, masks, student, teacher, center, tau_s, tau_t, tokens, wm=1.0, wv=1.0):
    """s, t: [M, N, d] full patch grids."""
    M, N, _ = s.shape
    total = 0.0
    for i in range(M):
        p, _ = naive_targets_softmax(t[i] if tokens == "all" else t[i][masks[i]], *teacher, center, tau_t)
        if tokens == "masked":
            idx = masks[i].nonzero().flatten().tolist()
            if not idx:
                continue                                   # counts in the divisor, contributes 0
            total = total + sum(naive_ce(p[n], s[i, j], *student, tau_s)
                                for n, j in enumerate(idx)) / len(idx)
        else:
            total = total + sum((wm if masks[i, j] else wv) * naive_ce(p[j], s[i, j], *student, tau_s)
                                for j in range(N)) / N
    return total / M


def ibot_masks(M, N):
    masks = torch.rand(M, N) < 0.4
    masks[0] = False                                    # an image with zero masked patches
    masks[-1, 0] = True                                 # and at least one masked patch
    return masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,wm,wv", [("masked", 1.0, 1.0), ("all", 1.0, 1.0), ("all", 2.0, 0.5)])
def test_ibot_matches_naive(seed, dtype, tokens, wm, wv):
    M, N, d, K = 3, 5, 6, 23
    tau_s, tau_t = 0.1, 0.07
    masks = ibot_masks(M, N)
    s = unit_rows(M * N, d, dtype).reshape(M, N, d).requires_grad_()
    t = unit_rows(M * N, d, dtype).reshape(M, N, d)
    student, teacher = prototypes(K, d, dtype, grad=True), prototypes(K, d, dtype)
    center = 0.2 * torch.randn(K, dtype=dtype)

    sel = ibot_rows(masks, tokens)
    rows_s = s.reshape(-1, d) if sel is None else s.reshape(-1, d)[sel]
    rows_t = t.reshape(-1, d) if sel is None else t.reshape(-1, d)[sel]
    loss, stat = ibot_loss(rows_s, rows_t, masks, student, teacher, tokens=tokens, masked_weight=wm,
                           visible_weight=wv, center=center, student_temp=tau_s, teacher_temp=tau_t)
    want = naive_ibot(s, t, masks, student, teacher, center, tau_s, tau_t, tokens, wm, wv)
    tol = proto_tol(dtype)
    close(loss, want.to(loss.dtype), tol)
    close(stat, naive_logits(rows_t, *teacher).mean(dim=0).to(stat.dtype), tol)
    got = torch.autograd.grad(loss, [s, *student])
    ref = torch.autograd.grad(want, [s, *student])
    for a, b in zip(got, ref):
        close(a, b, tol, scale=10)


def test_ibot_plus_plus_with_all_ones_mask_is_ibot_on_every_token(seed):
    M, N, d, K = 2, 7, 4, 13
    masks = torch.ones(M, N, dtype=torch.bool)
    s, t = unit_rows(M * N, d, torch.float32), unit_rows(M * N, d, torch.float32)
    student, teacher = prototypes(K, d, torch.float32), prototypes(K, d, torch.float32)
    center = torch.randn(K)
    plus, _ = ibot_loss(s, t, masks, student, teacher, tokens="all", center=center)
    masked, _ = ibot_loss(s, t, masks, student, teacher, tokens="masked", center=center)
    naive = naive_ibot(s.reshape(M, N, d), t.reshape(M, N, d), masks, student, teacher, center, 0.1,
                       0.04, "masked")
    close(plus, masked, torch.float32)
    close(plus, naive.float(), torch.float32)


def test_ibot_masked_with_no_masked_patch_is_zero(seed):
    M, N, d, K = 2, 4, 3, 5
    masks = torch.zeros(M, N, dtype=torch.bool)
    student = prototypes(K, d, torch.float32, grad=True)
    rows = unit_rows(0, d, torch.float32).requires_grad_()
    loss, stat = ibot_loss(rows, rows.detach(), masks, student, prototypes(K, d, torch.float32),
                           tokens="masked")
    assert loss.item() == 0.0 and stat is None
    loss.backward()                                      # still part of the graph


def test_ibot_bad_shapes():
    f = torch.float32
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 0] = True
    p = prototypes(5, 3, f)
    with pytest.raises(ValueError, match="student: expected 8 rows"):
        ibot_loss(unit_rows(7, 3, f), unit_rows(7, 3, f), masks, p, p, tokens="all")
    with pytest.raises(ValueError, match="student: expected 1 rows"):
        ibot_loss(unit_rows(8, 3, f), unit_rows(8, 3, f), masks, p, p, tokens="masked")
    with pytest.raises(ValueError, match="masks must be bool"):
        ibot_loss(unit_rows(8, 3, f), unit_rows(8, 3, f), masks.float(), p, p)
    with pytest.raises(ValueError, match="tokens='some'"):
        ibot_loss(unit_rows(8, 3, f), unit_rows(8, 3, f), masks, p, p, tokens="some")


# ------------------------------------------------------------------------------------------------
# Centering: one step late, over 3 steps
# ------------------------------------------------------------------------------------------------
def test_centering_is_one_step_late_over_three_steps(seed):
    B, L, d, K, m = 3, 2, 4, 11, 0.9
    centering = Centering(K, momentum=m)
    student, teacher = prototypes(K, d, torch.float32), prototypes(K, d, torch.float32)
    expected_center = torch.zeros(K, dtype=torch.float64)
    for step in range(3):
        s_local, t_global = unit_rows(L * B, d, torch.float32), unit_rows(B, d, torch.float32)
        c = centering.current()
        close(c.double(), expected_center, torch.float32)
        loss, stat = dino_loss(s_local, t_global, student, teacher, n_global=1, center=c)
        want = naive_dino(s_local, None, t_global, student, teacher, 1, B, expected_center, 0.1, 0.04)
        close(loss, want.float(), torch.float32)
        centering.update(stat)
        # the statistic is applied only at the next call, not now
        close(centering.center.double(), expected_center, torch.float32)
        batch_mean = naive_logits(t_global, *teacher).mean(dim=0)
        expected_center = m * expected_center + (1 - m) * batch_mean
    assert expected_center.abs().sum() > 0


def test_centering_checkpoints_pending_statistic(seed):
    a, b = Centering(5), Centering(5)
    a.update(torch.randn(5))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.current(), a.current())
    assert a.center.abs().sum() > 0
    with pytest.raises(ValueError, match="batch_mean must have 5"):
        a.update(torch.randn(6))


def test_centering_with_accumulation_updates_once_per_step(seed):
    """With begin_step (the training loop), micro-batches share one center and average their stats."""
    K, m = 7, 0.9
    centering = Centering(K, momentum=m)
    expected = torch.zeros(K)
    for step in range(3):
        centering.begin_step()
        torch.testing.assert_close(centering.center, expected)
        stats = [torch.randn(K) for _ in range(3)]            # three micro-batches of one step
        for stat in stats:
            torch.testing.assert_close(centering.current(), expected)   # same center for all three
            centering.update(stat)
        expected = m * expected + (1 - m) * torch.stack(stats).mean(dim=0)
    centering.begin_step()
    torch.testing.assert_close(centering.center, expected)
    assert expected.abs().sum() > 0


def test_centering_ignores_a_batch_without_rows(seed):
    """update(None) (no teacher row) neither moves the center nor counts in a step's mean."""
    K, m = 6, 0.9
    centering = Centering(K, momentum=m)
    start = torch.randn(K)
    centering.center.copy_(start)
    centering.begin_step()
    centering.update(None)
    centering.begin_step()
    assert torch.equal(centering.center, start)
    stat = torch.randn(K)
    centering.update(stat)
    centering.update(None)                                    # a later micro-batch without rows
    centering.begin_step()
    torch.testing.assert_close(centering.center, m * start + (1 - m) * stat)


# ------------------------------------------------------------------------------------------------
# Contrastive
# ------------------------------------------------------------------------------------------------
def naive_clip(u, v, scale):
    B = u.shape[0]
    u = u.double() / u.double().norm(dim=1, keepdim=True)
    v = v.double() / v.double().norm(dim=1, keepdim=True)
    S = [[scale * (u[i] * v[j]).sum() for j in range(B)] for i in range(B)]
    rows = sum(-S[i][i] + torch.logsumexp(torch.stack(S[i]), 0) for i in range(B)) / B
    cols = sum(-S[j][j] + torch.logsumexp(torch.stack([S[i][j] for i in range(B)]), 0)
               for j in range(B)) / B
    return (rows + cols) / 2


def naive_siglip(u, v, t, b):
    B = u.shape[0]
    u = u.double() / u.double().norm(dim=1, keepdim=True)
    v = v.double() / v.double().norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * (u[i] * v[j]).sum() + b)))
    return total / B


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5])
def test_clip_matches_naive(seed, dtype, B):
    u = torch.randn(B, 7, dtype=dtype, requires_grad=True)
    v = torch.randn(B, 7, dtype=dtype, requires_grad=True)
    log_scale = torch.tensor([math.log(1 / 0.07)], dtype=dtype, requires_grad=True)
    loss = clip_loss(u, v, log_scale)
    want = naive_clip(u, v, log_scale.double().exp()[0])
    close(loss, want.to(loss.dtype), dtype)
    for a, b in zip(torch.autograd.grad(loss, [u, v, log_scale]),
                    torch.autograd.grad(want, [u, v, log_scale])):
        close(a, b.to(a.dtype), dtype, scale=10)


def _anti_aligned_pairs(B=4, D=3):
    """Each text is the opposite of its image, so a sharper softmax (larger scale) only raises the
    loss: the gradient wrt the scale is positive and gradient descent must lower it."""
    u = torch.randn(B, D)
    return u, -u


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scale_above_the_cap_still_gets_a_gradient(seed, kind):
    """No clamp in the forward: above ln(100) the loss is the plain formula at exp(logit_scale), and
    its gradient can push the parameter back down (the cap is applied to the parameter after each
    optimiser step, fasttips.optim.clamp_logit_scale_)."""
    u, v = _anti_aligned_pairs()
    log_scale = torch.tensor([math.log(200.0)], requires_grad=True)
    bias = torch.tensor([-3.0])
    loss = contrastive_loss(kind, u, v, log_scale, bias)
    if kind == "clip":
        want = naive_clip(u, v, 200.0)
    else:
        want = naive_siglip(u, v, 200.0, -3.0)
    close(loss, want.float(), torch.float32)
    (grad,) = torch.autograd.grad(loss, [log_scale])
    assert grad.item() > 0                              # descent lowers the scale
    with torch.no_grad():
        log_scale -= 1e-3 * grad
    assert log_scale.item() < math.log(200.0)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 99.0])
def test_clip_below_the_cap_is_the_old_formula(seed, scale):
    """Below the cap, dropping the forward clamp changes nothing: exp(s).clamp(max=100) = exp(s)."""
    u, v = torch.randn(5, 4), torch.randn(5, 4)
    log_scale = torch.tensor([math.log(scale)])
    old_scale = min(math.exp(log_scale.item()), 100.0)
    close(clip_loss(u, v, log_scale), naive_clip(u, v, old_scale).float(), torch.float32)
    close(siglip_loss(u, v, log_scale, torch.tensor([-2.0])),
          naive_siglip(u, v, old_scale, -2.0).float(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_matches_naive(seed, dtype):
    u = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    v = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    t = torch.tensor([math.log(10.0)], dtype=dtype, requires_grad=True)
    b = torch.tensor([-10.0], dtype=dtype, requires_grad=True)
    loss = contrastive_loss("siglip", u, v, t, b)
    want = naive_siglip(u, v, t.double().exp()[0], b.double()[0])
    close(loss, want.to(loss.dtype), dtype)
    for x, y in zip(torch.autograd.grad(loss, [u, v, t, b]), torch.autograd.grad(want, [u, v, t, b])):
        close(x, y.to(x.dtype), dtype, scale=10)


def test_contrastive_bad_inputs():
    with pytest.raises(ValueError, match="text: expected 3 rows"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="text: expected last dim 4"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(1))
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="kind='cosine'"):
        contrastive_loss("cosine", torch.randn(3, 4), torch.randn(3, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="needs logit_bias"):
        contrastive_loss("siglip", torch.randn(3, 4), torch.randn(3, 4), torch.zeros(1))


# ------------------------------------------------------------------------------------------------
# KoLeo
# ------------------------------------------------------------------------------------------------
def naive_koleo(x):
    x = x.double()
    xs = [x[i] / max(x[i].norm(), 1e-8) for i in range(x.shape[0])]
    total = 0.0
    for i, xi in enumerate(xs):
        j = max((j for j in range(len(xs)) if j != i), key=lambda j: float((xi * xs[j]).sum().detach()))
        total = total - torch.log((xi - xs[j] + 1e-8).norm() + 1e-8)
    return total / len(xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 9])
def test_koleo_matches_naive(seed, dtype, n):
    x = torch.randn(n, 6, dtype=dtype, requires_grad=True)
    loss = koleo_loss(x)
    want = naive_koleo(x)
    close(loss, want.to(loss.dtype), dtype)
    close(torch.autograd.grad(loss, [x])[0], torch.autograd.grad(want, [x])[0].to(dtype), dtype, 10)


def test_koleo_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expected 2 dims"):
        koleo_loss(torch.randn(4))


# ------------------------------------------------------------------------------------------------
# Two ranks (gloo, CPU): all-gather with gradient, all-reduced centers
# ------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, world, store, inputs, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        u_all, v_all, scale, stats = inputs
        B = u_all.shape[0] // world
        u = u_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        v = v_all[rank * B:(rank + 1) * B].clone().requires_grad_()
        loss = clip_loss(u, v, scale)
        gu, gv = torch.autograd.grad(loss, [u, v])
        sig = siglip_loss(u.detach(), v.detach(), torch.tensor([2.0]), torch.tensor([-3.0]))
        centering = Centering(stats.shape[1], momentum=0.9)
        centering.update(stats[rank])
        center = centering.current().clone()
        results[rank] = (loss.detach(), gu, gv, sig, center)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_match_the_global_batch(seed, tmp_path):
    import torch.multiprocessing as mp
    world, B, D, K = 2, 3, 5, 7
    u_all = torch.randn(world * B, D, dtype=torch.float64)
    v_all = torch.randn(world * B, D, dtype=torch.float64)
    scale = torch.tensor([1.5], dtype=torch.float64)
    stats = torch.randn(world, K)
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(world, str(tmp_path / "store"), (u_all, v_all, scale, stats), results),
             nprocs=world, join=True)
    u_ref, v_ref = u_all.clone().requires_grad_(), v_all.clone().requires_grad_()
    ref = naive_clip(u_ref, v_ref, scale.exp()[0])
    gu_ref, gv_ref = torch.autograd.grad(ref, [u_ref, v_ref])
    losses = [results[r][0] for r in range(world)]
    close(sum(losses) / world, ref, torch.float64)                   # mean over ranks = global loss
    for r in range(world):
        rows = slice(r * B, (r + 1) * B)
        # each rank's gradient sums every rank's loss (all-gather backward) = W × global gradient
        close(results[r][1], world * gu_ref[rows], torch.float64)
        close(results[r][2], world * gv_ref[rows], torch.float64)
        close(results[r][4], 0.1 * stats.mean(dim=0), torch.float32)  # mean of per-rank means
    sig_ref = naive_siglip(u_all, v_all, torch.tensor(2.0).exp(), -3.0)
    close(sum(results[r][3] for r in range(world)) / world, sig_ref.float(), torch.float32)


# ------------------------------------------------------------------------------------------------
# Two ranks, rank 1 without any row: masked-only iBOT + Sinkhorn-Knopp, and the centers
# ------------------------------------------------------------------------------------------------
def _rank_without_rows_worker(rank, world, store, inputs, results):
    from datetime import timedelta

    import torch.distributed as dist
    # A short collective timeout: a rank that skips an all-reduce fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        masks, student, teacher, student_protos, teacher_protos, center0 = inputs[rank]
        rows = student.clone().requires_grad_()
        protos = tuple(p.clone().requires_grad_() for p in student_protos)
        loss, stat = ibot_loss(rows, teacher, masks, protos, teacher_protos, tokens="masked",
                               centering="sinkhorn_knopp")
        loss.backward()
        # softmax centering: rank 1 (no rows) is left out of the mean, not counted as a zero or a center
        centering = Centering(center0.numel(), momentum=0.9)
        centering.begin_step()
        centering.update(stat)
        centering.begin_step()
        # no rank has a row: the center stays exactly where it was
        idle = Centering(center0.numel(), momentum=0.9)
        idle.center.copy_(center0)
        idle.begin_step()
        idle.update(None)
        idle.begin_step()
        results[rank] = (loss.detach(), stat, centering.center.clone(), idle.center.clone(),
                         protos[0].grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_masked_ibot_sinkhorn_with_a_rank_without_masked_patches(seed, tmp_path):
    """Rank 1 has no masked patch: it must still join SK's all-reduces (no hang), its loss is 0, and
    rank 0 gets the single-process SK over its own rows (rank 1 adds nothing to the normalisation)."""
    import torch.multiprocessing as mp
    world, M, N, d, K = 2, 2, 6, 4, 9
    masks0 = torch.zeros(M, N, dtype=torch.bool)
    masks0[0, :3] = True
    masks0[1, 4] = True
    R = int(masks0.sum())
    student_protos, teacher_protos = prototypes(K, d, torch.float32), prototypes(K, d, torch.float32)
    center0 = torch.randn(K)
    inputs = [(masks0, unit_rows(R, d, torch.float32), unit_rows(R, d, torch.float32), student_protos,
               teacher_protos, center0),
              (torch.zeros(M, N, dtype=torch.bool), unit_rows(0, d, torch.float32),
               unit_rows(0, d, torch.float32), student_protos, teacher_protos, center0)]
    results = mp.Manager().dict()
    ctx = mp.spawn(_rank_without_rows_worker, args=(world, str(tmp_path / "store"), inputs, results),
                   nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung in a collective")
    want, want_stat = ibot_loss(inputs[0][1], inputs[0][2], masks0, student_protos, teacher_protos,
                                tokens="masked", centering="sinkhorn_knopp")
    # the independent formula: SK over rank 0's R rows, token weight 1/(n_masked(image)·M)
    P = naive_sinkhorn(inputs[0][2], *teacher_protos, 0.04)
    image_of = masks0.nonzero()[:, 0]
    weight = 1.0 / (masks0.sum(dim=1)[image_of].double() * M)
    naive = sum(weight[j] * naive_ce(P[j], inputs[0][1][j], *student_protos, 0.1) for j in range(R))
    close(results[0][0], want, torch.float32)
    close(results[0][0], naive.float(), torch.float32)
    assert results[1][0].item() == 0.0 and results[1][1] is None
    assert torch.count_nonzero(results[1][4]) == 0                   # zero gradient, but a gradient
    close(results[0][2], 0.1 * want_stat, torch.float32)            # rank 0's statistic alone
    close(results[1][2], 0.1 * want_stat, torch.float32)            # (the same center on both ranks)
    for r in range(world):
        assert torch.equal(results[r][3], center0)
