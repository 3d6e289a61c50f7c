"""fasttips.models: the TIPS vision tower, text tower, projection heads and build_model."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from fasttips import config
from fasttips.models import build_model, param_count, sinusoidal_positions

P = 14


def tiny_cfg(**overrides):
    cfg = config.preset("tiny")
    for key, value in overrides.items():
        config.set_value(cfg, key.replace("__", "."), value)
    return cfg


@pytest.fixture
def model(seed):
    return build_model(tiny_cfg())


def crop(batch, size):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w)


def random_mask(batch, n, ratio=0.4):
    m = torch.rand(batch, n) < ratio
    m[0, 0] = True                         # at least one masked patch
    return m


def first_block_input(vision, *args, **kwargs):
    """The token stream [T, D] entering block 0 (after patch embed, mask, position, CLS)."""
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach()

    handle = vision.blocks[0].register_forward_pre_hook(grab)
    try:
        vision(*args, **kwargs)
    finally:
        handle.remove()
    return seen["x"]


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------
def test_shapes_single_and_list(model):
    D = model.vision.width
    out = model.vision(crop(3, 28))
    assert set(out) == {"cls1", "cls2", "patch"}
    assert out["cls1"].shape == (3, D) and out["cls2"].shape == (3, D) and out["patch"].shape == (3, 4, D)
    outs = model.vision([crop(2, 42), crop(5, 28), crop(1, (28, 56))])
    assert [o["patch"].shape for o in outs] == [(2, 9, D), (5, 4, D), (1, 8, D)]
    assert all(o["cls1"].shape == (o["patch"].shape[0], D) for o in outs)
    assert all(t._base is None for o in outs for t in o.values())     # own tensors, not views (FSDP2)
    assert model.vision.num_patches(112) == 64 and model.vision.num_patches((28, 56)) == 8


def test_packed_list_equals_separate_values_and_grads(model):
    vision = model.vision
    crops = [crop(2, 42), crop(3, 28), crop(2, 56)]
    masks = [random_mask(2, 9), None, random_mask(2, 16)]
    weights = [{k: torch.randn_like(v) for k, v in o.items()} for o in vision(crops, masks)]

    def loss_and_grads(outputs):
        loss = sum((o[k] * w[k]).sum() for o, w in zip(outputs, weights) for k in o)
        vision.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in vision.named_parameters() if p.grad is not None}

    packed = vision(crops, masks)
    separate = [vision(c, masks=m) for c, m in zip(crops, masks)]
    for a, b in zip(packed, separate):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    g_packed, g_sep = loss_and_grads(packed), loss_and_grads(separate)
    assert g_packed.keys() == g_sep.keys() and "mask_token" in g_packed
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_sep[name], atol=1e-4, rtol=1e-4, msg=name)


def test_list_is_one_pass_with_one_varlen_attention_per_layer(model, monkeypatch):
    from fasttips import kernels
    calls = {"dense": 0, "varlen": 0}
    dense, varlen = kernels.attention, kernels.attention_varlen

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "attention", count("dense", dense))
    monkeypatch.setattr(kernels, "attention_varlen", count("varlen", varlen))
    outs = model.vision([crop(2, 28), crop(0, 42), crop(1, 42)], [None, None, random_mask(1, 9)])
    assert calls == {"dense": 0, "varlen": len(model.vision.blocks)}
    assert outs[1]["patch"].shape == (0, 9, model.vision.width)
    calls.update(dense=0, varlen=0)
    model.vision([crop(2, 28), crop(3, 28)])            # equal lengths: the dense kernel
    assert calls == {"dense": len(model.vision.blocks), "varlen": 0}


def test_packing_layout_is_built_once_and_inference_mode_kept_apart(model):
    from fasttips.models import Packing
    a, b = Packing.from_lengths([6, 6, 11], "cpu"), Packing.from_lengths([6, 6, 11], "cpu")
    assert a.cu_seqlens is b.cu_seqlens and a.token_seq is b.token_seq          # no rebuild per call
    assert a.cu_seqlens.tolist() == [0, 6, 12, 23] and a.token_seq.tolist() == [0] * 6 + [1] * 6 + [2] * 11
    assert Packing.from_lengths([4, 4], "cpu").token_seq is None
    crops = [crop(2, 42), crop(3, 28)]
    with torch.inference_mode():
        model.vision(crops)
        inference = Packing.from_lengths([6, 6, 11], "cpu")
    assert inference.cu_seqlens is not a.cu_seqlens and not a.cu_seqlens.is_inference()
    out = model.vision(crops)                 # after an inference-mode pass of the same layout
    sum(o["patch"].sum() for o in out).backward()
    assert model.vision.blocks[0].attn.qkv.weight.grad is not None


def _values_and_grads(fn, module, crops, masks):
    """Outputs of ``fn(crops, masks)`` (a list of dicts) and the gradients of a fixed weighting of them."""
    module.zero_grad(set_to_none=True)
    outs = fn(crops, masks)
    loss = sum((o[k] * torch.linspace(-1, 1, o[k].numel()).view_as(o[k])).sum() for o in outs for k in o)
    loss.backward()
    return ([o[k].detach() for o in outs for k in o],
            {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})


def _assert_same(compiled, eager):
    for a, b in zip(compiled[0], eager[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_multicrop_vit_compiles_to_one_graph(seed, monkeypatch, backend):
    """The packed multi-crop forward (two crop sizes, masks) traces into ONE graph (before: a graph
    break per packing tensor built and per layer, on inference-mode queries and the host record of
    cu_seqlens), and the compiled forward gives eager's values and gradients (aot_eager; "triton":
    the attention kernels in the interpreter)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the Triton kernels)")
    monkeypatch.setenv("FASTTIPS_KERNELS", backend)
    vision = build_model(tiny_cfg(vision__depth=1)).vision
    crops, masks = [crop(2, 28), crop(2, 28), crop(3, 14)], [None, random_mask(2, 4), None]
    torch._dynamo.reset()
    compiled = torch.compile(vision, backend="aot_eager", fullgraph=True)     # raises on any graph break
    _assert_same(_values_and_grads(compiled, vision, crops, masks), _values_and_grads(vision, vision, crops, masks))


def test_a_block_on_a_packed_stream_compiles_fullgraph(seed):
    """One block of the packed multi-crop stream under torch.compile(fullgraph=True): eager's values
    and gradients (the per-block compile of ``train.compile=blocks``)."""
    from fasttips.models import Packing
    vision = build_model(tiny_cfg(vision__depth=1)).vision
    block = vision.blocks[0]
    packing = Packing.from_lengths([6, 6, 3, 3, 3], "cpu")
    x = torch.randn(21, vision.width)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    fn = lambda mod: lambda xs, _: [{"x": mod(xs[0], packing)}]   # noqa: E731
    _assert_same(_values_and_grads(fn(compiled), block, [x], None), _values_and_grads(fn(block), block, [x], None))


def test_bf16_autocast_keeps_fp32_residual_and_stays_close(model):
    crops, mask = [crop(2, 28), crop(2, 42)], [random_mask(2, 4), None]
    ref = model.vision(crops, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.vision(crops, mask)
        text = model.text(torch.randint(1, 100, (2, 5)), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(text).all()
    for a, b in zip(low, ref):
        for k in a:
            assert a[k].dtype == torch.float32
            torch.testing.assert_close(a[k], b[k], atol=0.1, rtol=0.05)


def test_masks_replace_exactly_the_masked_patch_embeddings(model):
    vision = model.vision
    with torch.no_grad():
        vision.mask_token.normal_()               # zero at init; make it visible
    x, mask = crop(3, 42), random_mask(3, 9)
    tokens = first_block_input(vision, x, masks=mask).view(3, 2 + 9, -1)
    patches = vision.patch_embed(x).detach()
    pos = vision.position_embedding(3, 3).detach()
    expected = torch.where(mask[..., None], vision.mask_token.detach(), patches) + pos
    torch.testing.assert_close(tokens[:, 2:], expected, atol=1e-6, rtol=1e-6)

    # An all-False mask is the same as no mask; any masked patch changes the output.
    none = vision(x)["patch"]
    torch.testing.assert_close(vision(x, masks=torch.zeros(3, 9, dtype=torch.bool))["patch"], none)
    assert not torch.allclose(vision(x, masks=mask)["patch"], none)


def test_mask_token_gets_grad_only_when_something_is_masked(model):
    vision = model.vision
    x = crop(2, 28)
    vision(x, masks=torch.zeros(2, 4, dtype=torch.bool))["cls1"].square().sum().backward()
    grad = vision.mask_token.grad
    assert grad is None or torch.count_nonzero(grad) == 0
    vision.zero_grad(set_to_none=True)
    vision(x, masks=random_mask(2, 4))["cls1"].square().sum().backward()
    assert torch.count_nonzero(vision.mask_token.grad) > 0


def test_cls_tokens_carry_no_position_embedding(model):
    vision = model.vision
    outs = [crop(2, 28), crop(1, 56)]
    tokens = first_block_input(vision, outs)
    cls = vision.cls_tokens.detach()
    torch.testing.assert_close(tokens[0:2], cls, atol=0, rtol=0)          # image 0 of crop 0
    torch.testing.assert_close(tokens[6:8], cls, atol=0, rtol=0)          # image 1 of crop 0
    torch.testing.assert_close(tokens[12:14], cls, atol=0, rtol=0)        # image 0 of crop 1
    # Shifting the whole position grid moves the patch tokens but not the CLS tokens.
    with torch.no_grad():
        vision.pos_embed.add_(1.0)
    torch.testing.assert_close(first_block_input(vision, outs)[0:2], cls, atol=0, rtol=0)


def test_position_grid_resize(model, seed):
    vision = model.vision
    G = vision.pos_embed.shape[-1]
    grid = vision.pos_embed.detach()[0]                                    # [D, G, G]
    # Native size: no resampling, row-major patch order.
    same = vision.position_embedding(G, G)
    torch.testing.assert_close(same.view(G, G, -1).permute(2, 0, 1), grid, atol=0, rtol=0)
    # Non-square target: rows and columns resize independently (transpose-equivariant).
    with torch.no_grad():
        vision.pos_embed.copy_(torch.randn_like(vision.pos_embed))
        a = vision.position_embedding(3, 7).view(3, 7, -1)
        vision.pos_embed.copy_(vision.pos_embed.transpose(-1, -2).clone())
        b = vision.position_embedding(7, 3).view(7, 3, -1)
    torch.testing.assert_close(a, b.transpose(0, 1), atol=1e-6, rtol=1e-5)
    # A constant grid stays constant; the resize is bilinear (independent formula for upsampling).
    with torch.no_grad():
        vision.pos_embed.fill_(0.25)
        torch.testing.assert_close(vision.position_embedding(5, 9), torch.full((45, vision.width), 0.25))
        vision.pos_embed.copy_(torch.arange(G, dtype=torch.float32).view(1, 1, 1, G).expand_as(vision.pos_embed))
        up = vision.position_embedding(G, 2 * G).view(G, 2 * G, -1)[0, :, 0]
    centres = ((torch.arange(2 * G) + 0.5) / 2 - 0.5).clamp(0, G - 1)    # half-pixel centres, edge clamp
    torch.testing.assert_close(up, centres, atol=1e-5, rtol=1e-5)
    # Gradients reach the grid; in no_grad the resized grid is cached until the parameter changes.
    vision.position_embedding(4, 4).sum().backward()
    assert torch.count_nonzero(vision.pos_embed.grad) > 0
    with torch.no_grad():
        first = vision.position_embedding(4, 4)
        assert vision.position_embedding(4, 4) is first
        vision.pos_embed.mul_(2.0)
        torch.testing.assert_close(vision.position_embedding(4, 4), 2 * first)


def test_drop_path_is_per_image_and_train_only(seed):
    m = build_model(tiny_cfg(vision__drop_path=0.5))
    x = crop(6, 28)
    m.eval()
    torch.testing.assert_close(m.vision(x)["patch"], m.vision(x)["patch"])
    m.train()
    # Keep/drop is drawn per image, so between two runs an image changes in all of its tokens or
    # in none of them, never partially.
    outs = [m.vision(x)["patch"] for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    for o in outs:
        same = (o - outs[0]).abs().amax(-1) < 1e-6                         # [B, N]
        assert torch.equal(same.all(1), same.any(1))


def test_bad_crop_size_and_bad_masks_raise(model):
    with pytest.raises(ValueError, match=r"100.*patch size 14"):
        model.vision(crop(1, (100, 98)))
    with pytest.raises(ValueError, match=r"patch size 14"):
        model.vision([crop(1, 28), crop(1, 30)])
    with pytest.raises(ValueError, match=r"patch size 14"):
        model.vision.num_patches(225)
    with pytest.raises(ValueError, match="masks"):
        model.vision(crop(2, 28), masks=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        model.vision([crop(2, 28)], masks=[None, None])


# ---------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------
def test_text_padding_invariance(model):
    text = model.text
    B, L = 4, 9
    lengths = torch.tensor([1, 4, 9, 6])
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids = torch.randint(1, 1000, (B, L)).masked_fill(pad, 0)
    pooled = text(ids, pad)
    assert pooled.shape == (B, model.vision.width)
    # Extra padding columns, and junk ids under the padding, change nothing.
    more_pad = F.pad(pad, (0, 7), value=True)
    junk = F.pad(ids, (0, 7)).masked_fill(more_pad, 0)
    junk[more_pad] = torch.randint(1, 1000, (int(more_pad.sum()),))
    torch.testing.assert_close(text(junk, more_pad), pooled, atol=1e-5, rtol=1e-5)
    # A valid token does change the output of its own row only.
    changed = ids.clone()
    changed[2, 3] = (changed[2, 3] % 999) + 1
    diff = (text(changed, pad) - pooled).abs().amax(1)
    assert diff[2] > 1e-4 and torch.all(diff[[0, 1, 3]] < 1e-6)


def test_text_sinusoid_and_pooling_formula(model):
    table = sinusoidal_positions(5, 8)
    half, pos = 4, torch.arange(5.0)[:, None]
    inv = 1e4 ** (-torch.arange(half) / (half - 1))
    torch.testing.assert_close(table, torch.cat([torch.sin(pos * inv), torch.cos(pos * inv)], 1))
    with pytest.raises(ValueError, match="pad"):
        model.text(torch.ones(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Heads, scalars and construction
# ---------------------------------------------------------------------------------------------
def test_projection_head(model):
    head = model.dino_head
    x = torch.randn(5, model.vision.width)
    z = head.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    with torch.no_grad():
        head.prototypes.g.uniform_(0.5, 2.0)
    w = head.prototypes.weight()
    torch.testing.assert_close(w.norm(dim=1), head.prototypes.g.detach())
    torch.testing.assert_close(head(x), z @ w.t())
    assert head.prototypes.v.shape == (512, 64) and head.prototypes.g.shape == (512,)
    assert model.ibot_head is not model.dino_head
    shared = build_model(tiny_cfg(heads__shared=True), device="meta")
    assert shared.ibot_head is shared.dino_head
    assert param_count(shared) == param_count(model) - param_count(model.ibot_head)


def test_scalars_and_init(seed):
    cfg = tiny_cfg()
    m = build_model(cfg)
    assert m.logit_scale.shape == (2,) and m.logit_bias.shape == (2,)
    torch.testing.assert_close(m.logit_scale.detach(), torch.full((2,), cfg.loss.init_logit_scale))
    torch.testing.assert_close(m.logit_bias.detach(), torch.full((2,), -10.0))
    assert torch.count_nonzero(m.vision.mask_token) == 0
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # Meta → to_empty → init_weights gives the same model as a direct build with the same seed.
    torch.manual_seed(seed)
    direct = build_model(cfg)
    lazy = build_model(cfg, device="meta")
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(seed)
    lazy.init_weights()
    for (n, a), (_, b) in zip(direct.named_parameters(), lazy.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    copy.deepcopy(lazy)                                   # EMA teachers deep-copy heads / models


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_every_preset_builds_on_meta(name):
    m = build_model(config.preset(name), device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert param_count(m.vision) > 0 and len(m.vision.blocks) == config.preset(name).vision.depth


def test_vit_g_param_count():
    m = build_model(config.preset("vit-g"), device="meta")
    n = param_count(m.vision)
    assert abs(n - 1.13e9) / 1.13e9 < 0.01, n
    assert abs(param_count(m.text) - 389.1e6) / 389.1e6 < 0.01     # TIPS README's g/14 text tower


def test_towers_match_with_triton_attention_interpreted(seed, monkeypatch):
    """The towers' q/k/v views (strided, packed and dense+padding) through the Triton kernels
    (TRITON_INTERPRET=1 on CPU) give the reference's values and gradients."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors through the Triton kernels)")
    m = build_model(tiny_cfg(vision__depth=1, text__depth=1))
    crops, masks = [crop(2, 28), crop(1, 42)], [random_mask(2, 4), None]
    ids = torch.randint(1, 1000, (2, 6))
    pad = torch.arange(6)[None] >= torch.tensor([[3], [6]])

    def run(backend):
        monkeypatch.setenv("FASTTIPS_KERNELS", backend)
        m.zero_grad(set_to_none=True)
        outs = m.vision(crops, masks)
        text = m.text(ids, pad)
        loss = sum((o[k] * torch.linspace(-1, 1, o[k].numel()).view_as(o[k])).sum()
                   for o in outs for k in o) + text.square().sum()
        loss.backward()
        values = [o[k].detach() for o in outs for k in o] + [text.detach()]
        return values, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_values, ref_grads = run("reference")
    tri_values, tri_grads = run("triton")
    for a, b in zip(tri_values, ref_values):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert tri_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(tri_grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
