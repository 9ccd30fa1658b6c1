"""Scoped attention capture (no patching) and entropy; the two-stage OT objective: test_clip_ot.py."""

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
