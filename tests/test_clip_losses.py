"""DHN-NCE (paper + parity numbers of medclipsamv2_reference §9) and CLIP-DPO properties (dpo_reference §9)."""

import math

import numpy as np
import pytest
import torch
from negdpo.preference.clip.losses import (
    clip_contrastive_loss,
    clip_dpo_loss,
    clip_dpo_pair_loss,
    dhn_nce_loss,
)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


V2 = t([[1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]])
T2 = t([[0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])


@pytest.mark.parametrize("kwargs,expected", [
    (dict(v=np.eye(2), mode="parity"), -3.0529610277865573),
    (dict(v=np.eye(2), mode="paper"), -3.3333333333333335),
    (dict(v=np.eye(2), mode="parity", temperature=1.0), -2.3862943611198904),
    (dict(mode="parity"), -1.8350990491820893),
    (dict(mode="paper"), 0.01999010559589472),
    (dict(mode="parity", alpha=1.0), 0.9731454804753094),
    (dict(mode="paper", alpha=1.0), 1.4582158563802268),
    (dict(mode="parity", batch_size=16), 2.1947069919024407),
    (dict(mode="paper", alpha=1.0, beta1=0.0, beta2=0.0), 1.428404944810978),
])
def test_dhn_nce_reference_numbers(kwargs, expected):
    v = kwargs.pop("v", None)
    img, txt = (t(v), t(v)) if v is not None else (V2, T2)
    assert dhn_nce_loss(img, txt, **kwargs).item() == pytest.approx(expected, abs=1e-12)


def test_dhn_nce_properties():
    # parity: depends on beta1 + beta2 only; both modes scale invariant; batch_size=1 degenerate values
    a = dhn_nce_loss(V2, T2, beta1=0.3, beta2=0.0, mode="parity")
    assert a.item() == pytest.approx(dhn_nce_loss(V2, T2, mode="parity").item(), abs=1e-12)
    for mode in ("paper", "parity"):
        assert dhn_nce_loss(3.7 * V2, T2, mode=mode).item() == pytest.approx(dhn_nce_loss(V2, T2, mode=mode).item())
    assert dhn_nce_loss(V2, T2, mode="parity", batch_size=1).item() == -math.inf
    assert dhn_nce_loss(V2, T2, mode="parity", batch_size=1, alpha=1.0).item() == 0.0
    rng = np.random.default_rng(0)
    v, tt = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    assert dhn_nce_loss(t(v), t(tt), mode="parity", batch_size=16).item() == pytest.approx(1.73786486085614, abs=1e-12)
    # paper, alpha=1, beta=0 = 2 x symmetric InfoNCE at scale 1/tau
    assert dhn_nce_loss(V2, T2, alpha=1.0, beta1=0, beta2=0).item() == pytest.approx(
        2 * clip_contrastive_loss(V2, T2, 1 / 0.6).item(), abs=1e-12)
    with pytest.raises(ValueError):
        dhn_nce_loss(V2, T2, mode="nope")


def test_dpo_at_reference_is_log2_and_other_types():
    s = torch.randn(6, dtype=torch.float64)
    r = torch.randn(6, dtype=torch.float64)
    loss, m = clip_dpo_loss(s, r, s.clone(), r.clone(), beta=0.1)
    assert loss.item() == math.log(2)
    assert m["rewards/accuracies"].item() == 0.0 and m["rewards/margins"].item() == 0.0
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert clip_dpo_loss(s, r, s, r, 0.1, "hinge")[0].item() == 1.0
    assert clip_dpo_loss(s, r, s, r, 2.0, "ipo")[0].item() == pytest.approx(1 / (4 * 2.0 ** 2))
    assert clip_dpo_loss(s, r, s, r, 0.1, "robust", label_smoothing=0.2)[0].item() == pytest.approx(math.log(2))


def test_dpo_swap_negates_margin():
    pc, pr, rc, rr = torch.randn(4, 8, dtype=torch.float64)
    _, m1 = clip_dpo_loss(pc, pr, rc, rr, beta=0.5)
    _, m2 = clip_dpo_loss(pr, pc, rr, rc, beta=0.5)
    assert m2["rewards/margins"].item() == pytest.approx(-m1["rewards/margins"].item())
    l1, _ = clip_dpo_loss(pc, pr, rc, rr, beta=0.5, reduce=False)
    l2, _ = clip_dpo_loss(pr, pc, rr, rc, beta=0.5, reduce=False)
    assert torch.allclose(torch.exp(-l1) + torch.exp(-l2), torch.ones_like(l1))  # sigma(z) + sigma(-z) = 1


def test_partition_function_cancels():
    """Softmax log-probs over a candidate set containing both images give the same h as raw similarities."""
    torch.manual_seed(0)
    kappa = 14.3
    pol = kappa * torch.randn(5, 7, dtype=torch.float64).tanh()  # s(x_k, y) for 7 candidates, 5 texts
    ref = kappa * torch.randn(5, 7, dtype=torch.float64).tanh()
    c, r = 0, 3
    lp, lr_ = pol.log_softmax(1), ref.log_softmax(1)
    a, _ = clip_dpo_loss(lp[:, c], lp[:, r], lr_[:, c], lr_[:, r], beta=0.2, reduce=False)
    b, _ = clip_dpo_loss(pol[:, c], pol[:, r], ref[:, c], ref[:, r], beta=0.2, reduce=False)
    assert torch.allclose(a, b, atol=1e-12)


def test_pair_loss_bounds_and_directions():
    sims = 14.3 * (2 * torch.rand(4, 2, 2, dtype=torch.float64) - 1)
    loss, m = clip_dpo_pair_loss(sims, sims.clone(), beta=1.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert {"t2i/rewards/margins", "i2t/rewards/margins", "preference/accuracy"} <= set(m)
    # |h| <= 4 kappa
    ref = -sims
    _, m = clip_dpo_pair_loss(sims, ref, beta=1.0)
    assert abs(m["rewards/margins"].item()) <= 4 * 14.3


def test_contrastive_dedup_captions():
    """Duplicate captions: plain InfoNCE has an unreachable floor; de-duplicated ids remove it."""
    g = torch.Generator().manual_seed(0)
    v, tt = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    plain = clip_contrastive_loss(v, tt, 3.0).item()
    assert clip_contrastive_loss(v, tt, 3.0, torch.arange(6)).item() == pytest.approx(plain, abs=1e-12)
    assert clip_contrastive_loss(v, tt, 3.0, torch.tensor([5, 3, 1, 0, 2, 4])).item() == pytest.approx(plain, abs=1e-12)
    ids = torch.tensor([0, 1, 0, 1, 2, 1])  # e.g. two healthy captions repeated
    e = torch.eye(3, dtype=torch.float64)[ids]  # perfect features: each image on its caption
    assert clip_contrastive_loss(e, e, 50.0).item() > math.log(2) / 2  # floor from the duplicates
    assert clip_contrastive_loss(e, e, 50.0, ids).item() == pytest.approx(0.0, abs=1e-12)
    x = v.clone().requires_grad_(True)
    clip_contrastive_loss(x, tt, 3.0, ids).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
