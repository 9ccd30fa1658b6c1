"""Scoped attention capture (no patching), entropy, and the two-stage OT objective."""

import copy

import pytest
import torch
from negdpo.preference.clip.attention import (
    attention_entropy,
    attention_mask_pull,
    capture_attention,
    mask_to_patches,
    vision_trunk,
)
from negdpo.preference.clip.ot import curriculum_weight, sinkhorn_cost, two_stage_loss


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
    tok_pos = torch.randn(3, 16, 8, requires_grad=True)
    tok_neg = torch.randn(3, 16, 8)
    masks = torch.zeros(3, 16)
    masks[:, 5:8] = 1.0
    for w in (0.0, 0.5, 1.0):
        loss, logs = two_stage_loss(tok_pos, masks, tok_neg, w)
        assert torch.isfinite(loss) and logs["stages/weight2"] == w
    loss.backward()
    assert tok_pos.grad.abs().sum() > 0
