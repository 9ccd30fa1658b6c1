"""The two-stage OT objective (preference/clip/ot.py): Sinkhorn cost against a plain reference, lesion
InfoNCE by hand, the stage losses against their parts and the curriculum (pure tensors, fast, no models)."""


import pytest
import torch
from negdpo.preference.clip.ot import (
    _split,
    curriculum_weight,
    lesion_infonce,
    sinkhorn_cost,
    stage1_loss,
    stage2_loss,
    two_stage_loss,
)


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
