"""Scoped attention capture (no patching), entropy, and the two-stage OT objective."""

import copy
import math

import pytest
import torch
from negdpo.preference.clip.attention import (
    AttentionRecord,
    _attn_probs,
    attention_entropy,
    attention_mask_pull,
    capture_attention,
    cls_patch_attention,
    mask_to_patches,
    vision_trunk,
)
from negdpo.preference.clip.ot import (
    _split,
    curriculum_weight,
    lesion_infonce,
    sinkhorn_cost,
    stage1_loss,
    stage2_loss,
    two_stage_loss,
)


@pytest.fixture(scope="module")
def model(tiny_clip):
    return copy.deepcopy(tiny_clip[0]).eval()


def _manual_probs(attn, x):
    b, n, c = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) / (c // attn.num_heads) ** 0.5).softmax(-1)


@pytest.mark.parametrize("fused", [True, False])
def test_capture_matches_manual_and_restores(model, fused):
    trunk = vision_trunk(model)
    attn_cls = type(trunk.blocks[0].attn)
    forward_before = attn_cls.forward
    for blk in trunk.blocks:
        blk.attn.fused_attn = fused
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref_out = model.encode_image(x)
        inputs = {}
        h = trunk.blocks[-1].norm1.register_forward_hook(lambda m, a, o: inputs.__setitem__("x", o))
        model.encode_image(x)
        h.remove()
        with capture_attention(model, blocks=(0, -1)) as rec:
            out = model.encode_image(x)
        assert torch.equal(out, ref_out)  # forward untouched inside the context
    assert sorted(rec) == [0, len(trunk.blocks) - 1]
    manual = _manual_probs(trunk.blocks[-1].attn, inputs["x"])
    assert torch.allclose(rec[len(trunk.blocks) - 1], manual, atol=1e-6)
    assert torch.allclose(rec[0].sum(-1), torch.ones(2, 2, 197), atol=1e-5)
    # after exit: no hooks, same class method, no instance attribute, same outputs
    assert attn_cls.forward is forward_before
    for blk in trunk.blocks:
        assert not blk.attn._forward_hooks and "forward" not in vars(blk.attn)
        assert blk.attn.fused_attn is fused
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), ref_out)


def test_capture_restores_on_error(model):
    trunk = vision_trunk(model)
    with pytest.raises(RuntimeError), capture_attention(model, (-1,)):
        raise RuntimeError("boom")
    assert not trunk.blocks[-1].attn._forward_hooks


def test_entropy_and_mask_pull_gradients(model):
    x = torch.randn(2, 3, 224, 224)
    with capture_attention(model, (-1,)) as rec:
        model.encode_image(x)
    probs = rec.stacked()
    ent = attention_entropy(probs)
    assert ent.shape == (2,) and ((ent > 0) & (ent <= 1 + 1e-6)).all()
    mask = torch.zeros(2, 224, 224)
    mask[0, 64:128, 64:128] = 1
    pm = mask_to_patches(mask, (14, 14))
    pull = attention_mask_pull(probs, pm)
    assert pull[1] == 0 and pull[0] > 0
    (ent.mean() + pull.mean()).backward()
    assert vision_trunk(model).blocks[-1].attn.qkv.weight.grad is not None
    # uniform attention -> normalised entropy 1; one-hot -> 0
    uni = torch.full((1, 1, 5, 5), 0.2)
    assert attention_entropy(uni).item() == pytest.approx(1.0)
    hot = torch.zeros(1, 1, 5, 5)
    hot[..., 0, 1] = 1
    assert attention_entropy(hot).item() == pytest.approx(0.0, abs=1e-6)


def _cls_rows(rows):
    """(blocks, B=1, heads, N, N) probabilities whose CLS rows are ``rows`` [blocks][heads] (other rows uniform)."""
    n = len(rows[0][0])
    out = torch.full((len(rows), 1, len(rows[0]), n, n), 1.0 / n, dtype=torch.float64)
    for b, heads in enumerate(rows):
        for h, r in enumerate(heads):
            out[b, 0, h, 0] = torch.tensor(r, dtype=torch.float64)
    return out


def test_entropy_hand_values():
    """Per-head entropy of the CLS->patch row, renormalised over patches, then head and block means."""
    probs = _cls_rows([[[0.2, 0.4, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]],  # patches [.5 .25 .25] and uniform
                       [[0.0, 1.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]])  # one-hot and [.5 .5 0]
    h = [1.5 * math.log(2), math.log(3), 0.0, math.log(2)]
    assert attention_entropy(probs, normalized=False).item() == pytest.approx(sum(h) / 4, abs=1e-9)
    assert attention_entropy(probs).item() == pytest.approx(sum(h) / 4 / math.log(3), abs=1e-9)
    assert attention_entropy(probs[0]).item() == pytest.approx((h[0] + h[1]) / 2 / math.log(3), abs=1e-9)
    # two prefix tokens: token 1 (0.4) is not a patch, the two patches [.2 .2] are uniform
    assert attention_entropy(probs[:1, :, :1], num_prefix_tokens=2).item() == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(cls_patch_attention(probs[0], 1)[0, 0], torch.tensor([0.5, 0.25, 0.25],
                                                                                    dtype=torch.float64))


def test_mask_pull_and_patch_mask_hand_values():
    probs = _cls_rows([[[0.2, 0.4, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]]])[0]  # (B=1, heads 2, 4, 4)
    pm = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)  # q = [2/3, 0, 1/3]
    ce0 = -(2 / 3 * math.log(0.5) + 1 / 3 * math.log(0.25))
    ce1 = -math.log(1 / 3)
    assert attention_mask_pull(probs, pm).item() == pytest.approx((ce0 + ce1) / 2, abs=1e-9)
    two = torch.cat([probs, probs])
    pull = attention_mask_pull(two, torch.cat([pm, torch.zeros_like(pm)]))
    assert pull[1].item() == 0.0 and pull[0].item() == pytest.approx((ce0 + ce1) / 2, abs=1e-9)
    mask = torch.zeros(1, 4, 6)
    mask[0, :2, :3] = 1
    mask[0, 3, 5] = 1
    torch.testing.assert_close(mask_to_patches(mask, (2, 2)), torch.tensor([[1.0, 0.0, 0.0, 1 / 6]]))


def test_capture_reads_prefix_tokens_from_the_model():
    """Defect: the prefix count was hard-coded to 1; a ViT with register tokens has CLS + registers."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, reg_tokens=2, num_classes=0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        vit.blocks[-1].attn.qkv.weight.mul_(8.0)  # sharper than random-init (near uniform) attention
    with torch.no_grad(), capture_attention(vit, (-1,)) as rec:
        vit(torch.randn(2, 3, 32, 32))
    assert rec.num_prefix_tokens == 3
    probs = rec.stacked()
    assert probs.shape == (1, 2, 2, 19, 19)
    row = probs[0, :, :, 0, 3:]
    p = row / row.sum(-1, keepdim=True)
    manual = (-(p * p.log()).sum(-1) / math.log(16)).mean(-1)
    torch.testing.assert_close(attention_entropy(probs, rec.num_prefix_tokens), manual)
    assert not torch.allclose(attention_entropy(probs, 1), manual)


def test_sinkhorn_self_below_cross_and_order_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 16, generator=g, dtype=torch.float64)
    b = torch.randn(25, 16, generator=g, dtype=torch.float64) + 1.5
    self_cost, cross = sinkhorn_cost(a, a), sinkhorn_cost(a, b)
    assert self_cost < cross
    perm = sinkhorn_cost(a[torch.randperm(20, generator=g)], b[torch.randperm(25, generator=g)])
    assert perm.item() == pytest.approx(cross.item(), rel=1e-6)
    x = a.clone().requires_grad_(True)
    sinkhorn_cost(x, b).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_two_stage_loss_and_curriculum():
    assert curriculum_weight(0, 100) == 0.0 and curriculum_weight(100, 100) == 1.0
    assert curriculum_weight(50, 100) == pytest.approx(0.5)
    assert curriculum_weight(20, 100) == 0.0 and curriculum_weight(80, 100) == 1.0  # clipped outside [.3, .7]
    assert curriculum_weight(40, 100) == pytest.approx(0.25)
    assert curriculum_weight(5, 0) == 1.0
    assert curriculum_weight(0, 1) == 0.0 and curriculum_weight(1, 1) == 1.0
    assert curriculum_weight(49, 100, 0.5, 0.5) == 0.0 and curriculum_weight(50, 100, 0.5, 0.5) == 1.0
    g = torch.Generator().manual_seed(0)
    tok_pos = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    tok_neg = torch.randn(3, 16, 8, generator=g)
    masks = torch.zeros(3, 16)
    masks[:, 5:8] = 1.0
    s1 = torch.stack([stage1_loss(tok_pos[i], masks[i], tok_pos[(i + 1) % 3], masks[(i + 1) % 3])[0]
                      for i in range(3)]).mean()
    s2 = torch.stack([stage2_loss(tok_pos[i], masks[i], tok_neg[i])[0] for i in range(3)]).mean()
    for w in (0.0, 0.5, 1.0):
        loss, logs = two_stage_loss(tok_pos, masks, tok_neg, w)
        assert loss.item() == pytest.approx(((1 - w) * s1 + w * s2).item(), rel=1e-6)
        assert logs["stages/weight2"] == w
    loss.backward()
    assert tok_pos.grad.abs().sum() > 0


def test_lesion_infonce_hand_value():
    import numpy as np

    anchors = np.array([[3.0, 4.0], [1.0, 0.0]])  # rows (not columns) are normalised: [.6 .8], [1 0]
    pos = np.array([2.0, 1.0])
    bg = np.array([[0.0, 3.0], [-1.0, 2.0], [2.0, -0.5]])

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def reference(tau):
        a, p, n = unit(anchors), unit(pos), unit(bg)
        logits = np.concatenate([(a @ p)[:, None], a @ n.T], axis=1) / tau
        return float(np.mean(-(logits[:, 0] - np.log(np.exp(logits).sum(1)))))

    t = torch.from_numpy
    assert lesion_infonce(t(anchors), t(pos), t(bg), 0.5).item() == pytest.approx(reference(0.5), abs=1e-12)
    assert lesion_infonce(t(anchors), t(pos), t(bg)).item() == pytest.approx(reference(0.1), abs=1e-9)  # default


def _sinkhorn_reference(x, y, reg, iters=3000):
    """Entropic OT <P, C> with uniform marginals and cosine cost, log-domain Sinkhorn written with numpy."""
    import numpy as np
    from scipy.special import logsumexp

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    c = 1 - xn @ yn.T
    la, lb = np.full(len(x), -np.log(len(x))), np.full(len(y), -np.log(len(y)))
    f, g = np.zeros(len(x)), np.zeros(len(y))
    for _ in range(iters):
        f = reg * (la - logsumexp((g[None] - c) / reg, axis=1))
        g = reg * (lb - logsumexp((f[:, None] - c) / reg, axis=0))
    p = np.exp((f[:, None] + g[None] - c) / reg)
    return float((p * c).sum())


def test_sinkhorn_against_a_plain_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.5
    ref = _sinkhorn_reference(x.numpy(), y.numpy(), 0.5)
    assert sinkhorn_cost(x, y, reg=0.5).item() == pytest.approx(ref, rel=1e-5)
    assert sinkhorn_cost(x, y).item() == pytest.approx(_sinkhorn_reference(x.numpy(), y.numpy(), 0.05), rel=2e-3)
    w9 = torch.full((9,), 1 / 9, dtype=torch.float64)
    assert sinkhorn_cost(x, y, 0.5, wy=w9).item() == pytest.approx(ref, rel=1e-5)


def test_split_lesion_and_background():
    tokens = torch.arange(5, dtype=torch.float64)[:, None].repeat(1, 2)
    lesion, bg = _split(tokens, torch.tensor([0.0, 0.5, 1.0, 0.2, 0.0]), 0.5)
    assert lesion[:, 0].tolist() == [1, 2] and bg[:, 0].tolist() == [0, 4]  # >= threshold; exactly 0 = background
    lesion, bg = _split(tokens, torch.tensor([0.0, 0.1, 0.3, 0.2, 0.0]), 0.5)  # tiny lesion: the fullest patch
    assert lesion[:, 0].tolist() == [2] and bg[:, 0].tolist() == [0, 4]


def test_stage_losses_against_their_parts():
    g = torch.Generator().manual_seed(4)
    ta, tb, tn = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ma = torch.tensor([0.0, 1.0, 0.6, 0.0, 0.0, 0.3], dtype=torch.float64)  # lesion 1, 2; background 0, 3, 4
    mb = torch.tensor([0.9, 0.0, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)  # lesion 0, 3; background 1, 2, 4, 5
    la, lb = ta[[1, 2]], tb[[0, 3]]
    bg = torch.cat([ta[[0, 3, 4]], tb[[1, 2, 4, 5]]])
    nce = (lesion_infonce(la, lb.mean(0), bg, 0.1) + lesion_infonce(lb, la.mean(0), bg, 0.1)) / 2
    ot_cost = sinkhorn_cost(la, lb, 0.05)
    loss, logs = stage1_loss(ta, ma, tb, mb, ot_weight=0.7)
    assert loss.item() == pytest.approx((0.7 * ot_cost + nce).item(), rel=1e-9)
    assert logs == pytest.approx({"stages/ot": ot_cost.item(), "stages/nce1": nce.item()})
    loss2, logs2 = stage2_loss(ta, ma, tn)
    expect2 = lesion_infonce(la, la.mean(0), torch.cat([tn, ta[[0, 3, 4]]]), 0.1)
    assert loss2.item() == pytest.approx(expect2.item(), rel=1e-9) and logs2 == {"stages/nce2": pytest.approx(
        expect2.item())}


def test_vision_trunk_unwraps_peft_style_wrappers(model):
    trunk = vision_trunk(model)
    assert vision_trunk(model.visual) is trunk and vision_trunk(trunk) is trunk

    class Inner(torch.nn.Module):  # PEFT: PeftModel.base_model (LoraModel).model = the open_clip model
        def __init__(self, m):
            super().__init__()
            self.model = m

    class Outer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.base_model = Inner(m)

    assert vision_trunk(Outer(model)) is trunk
    msg = (r"^Linear: expected an open_clip model with a timm ViT vision tower \(visual\.trunk\.blocks\); "
           r"attention capture supports timm ViTs only$")
    with pytest.raises(TypeError, match=msg):
        vision_trunk(torch.nn.Linear(2, 2))


def test_attention_probabilities_with_masks(model):
    """Boolean masks (True = attend) and additive float masks, against softmax written out."""
    attn = vision_trunk(model).blocks[-1].attn
    torch.manual_seed(1)
    x = torch.randn(1, 5, attn.qkv.in_features)
    free = _attn_probs(attn, x, None)
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.head_dim ** -0.5
    torch.testing.assert_close(free, logits.softmax(-1))
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[:, 3:] = False
    masked = _attn_probs(attn, x, keep)
    assert masked[..., 3:].abs().max() == 0
    torch.testing.assert_close(masked[..., :3], logits[..., :3].softmax(-1))
    bias = torch.zeros(5, 5)
    bias[:, 0] = 2.0
    torch.testing.assert_close(_attn_probs(attn, x, bias), (logits + bias).softmax(-1))


def test_capture_defaults(model):
    trunk = vision_trunk(model)
    assert AttentionRecord().num_prefix_tokens == 1
    with torch.no_grad(), capture_attention(model) as rec:  # default: the last block
        model.encode_image(torch.randn(1, 3, 224, 224))
    assert sorted(rec) == [len(trunk.blocks) - 1] and rec.num_prefix_tokens == 1

    class Bare(torch.nn.Module):  # a trunk that does not say how many prefix tokens it has: CLS only
        def __init__(self, blocks):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            return x

    bare = Bare(copy.deepcopy(trunk.blocks[:2]))
    with torch.no_grad(), capture_attention(bare, (0,)) as rec:
        bare(torch.randn(1, 5, trunk.blocks[0].attn.qkv.in_features))
    assert rec.num_prefix_tokens == 1 and sorted(rec) == [0] and rec[0].shape[-1] == 5


def test_hook_reads_input_and_mask_however_passed(model):
    """The hook sees x and attn_mask passed positionally or by keyword (timm blocks pass them either way)."""
    trunk = vision_trunk(model)
    attn = trunk.blocks[0].attn
    torch.manual_seed(2)
    x = torch.randn(1, 5, attn.qkv.in_features)
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[:, 4] = False
    expect = _attn_probs(attn, x, keep)
    for args, kwargs in (((x, keep), {}), ((x,), {"attn_mask": keep}), ((), {"x": x, "attn_mask": keep})):
        with torch.no_grad(), capture_attention(model, (0,)) as rec:
            attn(*args, **kwargs)
        torch.testing.assert_close(rec[0], expect)
    with torch.no_grad(), capture_attention(model, (0,)) as rec:
        attn(x)
    torch.testing.assert_close(rec[0], _attn_probs(attn, x, None))
    broken = copy.deepcopy(model)
    vision_trunk(broken).blocks[1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="^block 1: Identity has no fused qkv projection$"), \
            capture_attention(broken, (0, 1)):
        pass
    assert not vision_trunk(broken).blocks[0].attn._forward_hooks  # the hook already placed is removed


def test_mask_pull_over_stacked_blocks_and_partial_coverage():
    probs = _cls_rows([[[0.2, 0.4, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3]],
                       [[0.0, 0.5, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]])  # (blocks 2, B 1, heads 2, 4, 4)
    pm = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)  # half a patch of lesion (total 0.5 < 1)
    ce = [-math.log(0.5), -math.log(1 / 3), -math.log(0.5), -math.log(1 / 3)]
    assert attention_mask_pull(probs, pm).item() == pytest.approx(sum(ce) / 4, abs=1e-9)
    torch.testing.assert_close(cls_patch_attention(probs), cls_patch_attention(probs, 1))


@pytest.mark.parametrize("b", [1, 2, 3])
def test_two_stage_branches_and_logs(b):
    """Stage 1 over pairs (i, i+1 mod B) only for w < 1 and B > 1; stage 2 for w > 0, or alone (weight 1) when B = 1."""
    g = torch.Generator().manual_seed(5)
    tok_pos, tok_neg = torch.randn(b, 16, 8, generator=g), torch.randn(b, 16, 8, generator=g)
    masks = torch.zeros(b, 16)
    masks[:, 5:8] = 1.0
    masks[:, 9] = 0.7
    s1 = [stage1_loss(tok_pos[i], masks[i], tok_pos[(i + 1) % b], masks[(i + 1) % b]) for i in range(b)]
    s2 = [stage2_loss(tok_pos[i], masks[i], tok_neg[i]) for i in range(b)]
    l1 = torch.stack([x[0] for x in s1]).mean()
    l2 = torch.stack([x[0] for x in s2]).mean()
    for w in (0.0, 0.4, 1.0):
        loss, logs = two_stage_loss(tok_pos, masks, tok_neg, w)
        expect = {"stages/weight2": w}
        if b == 1:
            value = l2
        else:
            value = (1 - w) * l1 * (w < 1) + w * l2
        if w < 1 and b > 1:
            expect["stages/ot"] = sum(m["stages/ot"] for _, m in s1) / b
            expect["stages/nce1"] = sum(m["stages/nce1"] for _, m in s1) / b
        if w > 0 or b == 1:
            expect["stages/nce2"] = sum(m["stages/nce2"] for _, m in s2) / b
        assert loss.item() == pytest.approx(float(value), rel=1e-6)
        assert logs == pytest.approx(expect, rel=1e-6)
