"""Masked mutual information (generator/mi.py) and the anatomy-preservation terms built on it: the MI
hinge and the fidelity hinge (pure tensors, fast, no models)."""

from __future__ import annotations

import math

import pytest
import torch
from negdpo.generator.losses import fidelity_loss
from negdpo.generator.mi import (
    channelwise_weighted_mi,
    histogram_mi,
    latents_to_unit,
    mi_hinge,
    outside_weight,
    parzen_weights,
    weighted_mi,
)


def _imgs(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 1, 32, 32, generator=g)
    b = (0.7 * a + 0.3 * torch.rand(2, 1, 32, 32, generator=g)).clamp(0, 1)
    return a, b


def test_masked_mi_equals_monai_on_all_ones_mask():
    from monai.losses import GlobalMutualInformationLoss

    a, b = _imgs()
    monai = GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5, reduction="none")(a, b)
    ours = weighted_mi(a, b, torch.ones_like(a))
    torch.testing.assert_close(-ours, monai.flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted_mi(a, b), ours)


def test_masked_mi_ignores_masked_pixels_value_and_gradient():
    a, b = _imgs(1)
    w = torch.ones_like(a)
    w[..., 8:20, 8:20] = 0
    a2 = a.clone()
    a2[..., 8:20, 8:20] = torch.rand(2, 1, 12, 12)
    torch.testing.assert_close(weighted_mi(a, b, w), weighted_mi(a2, b, w))
    a_req = a.clone().requires_grad_(True)
    weighted_mi(a_req, b, w).sum().backward()
    assert a_req.grad[..., 8:20, 8:20].abs().max().item() == 0.0
    assert a_req.grad.abs().sum().item() > 0
    inflated = weighted_mi(a * w, b * w)  # masking by multiplication is a different (inflated) estimate
    assert (inflated > weighted_mi(a, b, w)).all()


def test_masked_mi_symmetric_and_bounded():
    a, b = _imgs(2)
    w = torch.ones_like(a)
    w[..., :10] = 0
    torch.testing.assert_close(weighted_mi(a, b, w), weighted_mi(b, a, w), atol=1e-6, rtol=1e-5)
    assert (weighted_mi(a, a) <= math.log(23)).all()
    assert weighted_mi(a, torch.full_like(a, 0.5)).abs().max().item() < 1e-5


def test_mi_hinge_and_fidelity_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    src, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    w = outside_weight(mask, 1)
    hinge, _ = mi_hinge(x0, x0.detach().clone(), src, w, torch.ones(2))
    assert hinge.item() == 0.0
    assert fidelity_loss(x0, src, w, None, x0.detach().clone()).item() == 0.0


def _mask_weight():
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:5, 2:5] = 1
    mask[1, :, 5:7, 1:3] = 1
    return outside_weight(mask, 1)


def _unit(x):
    return ((x.clamp(-4, 4) + 4) / 8).double()


def test_mi_hinge_sign_penalises_only_the_policy_losing_anatomy():
    """Defect: flipping the sign inside the hinge passed every test (both signs are 0 at policy == ref)."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    w = _mask_weight()
    gate = torch.tensor([1.0, 0.25])
    good, m = mi_hinge(src.clone(), noise, src, w, gate)  # policy keeps the source, reference lost it
    assert good.item() == 0.0 and m["mi/policy"] > m["mi/ref"]
    pol = noise.clone().requires_grad_(True)
    bad, m = mi_hinge(pol, src.clone(), src, w, gate)  # policy lost the anatomy the reference kept
    ww = torch.broadcast_to(w, src.shape).double()
    mi = [[weighted_mi(_unit(a[b, c][None]), _unit(src[b, c][None]), ww[b, c][None]).item() for c in range(4)]
          for a in (src, noise) for b in range(2)]
    mi_ref, mi_pol = torch.tensor(mi[:2]).mean(1), torch.tensor(mi[2:]).mean(1)
    assert bad.item() == pytest.approx(((mi_ref - mi_pol) * gate).mean().item(), rel=1e-4)
    assert m["mi/policy"].item() == pytest.approx(mi_pol.mean().item(), rel=1e-4)
    assert m["mi/ref"].item() == pytest.approx(mi_ref.mean().item(), rel=1e-4)
    assert m["mi/hinge"].item() == pytest.approx(bad.item(), rel=1e-6)
    bad.backward()
    assert pol.grad.abs().sum() > 0
    assert mi_hinge(noise, src.clone(), src, w)[0].item() == pytest.approx((mi_ref - mi_pol).mean().item(), rel=1e-4)


def test_fidelity_hinge_sign_and_hand_values():
    """Outside-mask L1 (weights 1 = outside): absolute, reference-relative hinge, gate."""
    src = torch.zeros(2, 2, 2, 2)
    w = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    x = torch.zeros(2, 2, 2, 2)
    x[0, :, 0, 0], x[0, :, 0, 1], x[0, :, 1, :] = 1.0, -3.0, 100.0  # the inside (w = 0) must not count
    x[1, 0, 0, 0], x[1, 1, 0, 0] = 2.0, -4.0
    l1 = torch.tensor([(1 + 3) * 2 / 4, (2 + 4) / 2])  # [2, 3]
    torch.testing.assert_close(fidelity_loss(x, src, w), l1.mean())
    closer = 0.5 * x  # L1 [1, 1.5]
    assert fidelity_loss(closer, src, w, None, x).item() == 0.0  # policy closer to the source than ref: free
    torch.testing.assert_close(fidelity_loss(x, src, w, None, closer), (l1 / 2).mean())  # drifted: penalised
    gate = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(fidelity_loss(x, src, w, gate, closer), torch.tensor((0 + 2 * 1.5) / 2))
    torch.testing.assert_close(fidelity_loss(x - 5.0, src - 5.0, w), l1.mean())  # a distance: shift invariant
    # three channels, per-sample gate: a per-channel reduction or gate would not even broadcast
    x3, src3 = torch.cat([x, x[:, :1]], 1), torch.zeros(2, 3, 2, 2)
    l1_3 = torch.tensor([(1 + 3) * 3 / 6, (2 + 4 + 2) / 3])
    torch.testing.assert_close(fidelity_loss(x3, src3, w, gate), (l1_3 * gate).mean())
    xr = x.clone().requires_grad_(True)
    s2 = src.clone().requires_grad_(True)
    fidelity_loss(xr, s2, w, None, closer).backward()
    assert s2.grad is None and xr.grad[0, :, 1].abs().sum() == 0 and xr.grad.abs().sum() > 0


def test_mi_helpers_hand_values():
    torch.testing.assert_close(latents_to_unit(torch.tensor([-9.0, -4.0, 0.0, 2.0, 4.0, 7.0])),
                               torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(latents_to_unit(torch.tensor([1.0]), clip=2.0), torch.tensor([0.75]))
    mask = torch.zeros(1, 1, 6, 6)
    mask[0, 0, 2, 3] = 1
    assert outside_weight(mask, 0).sum().item() == 35
    w1 = outside_weight(mask, 1)
    assert w1.sum().item() == 36 - 9 and w1[0, 0, 1:4, 2:5].sum() == 0
    assert torch.equal(outside_weight(mask), w1)  # default: 1 px of dilation
    assert outside_weight(mask, 2).sum().item() == 36 - 25
    mask[0, 0, 5, 0] = 1  # a corner pixel: its 3x3 dilation is clipped by the border to 2x2
    assert outside_weight(mask, 1).sum().item() == 36 - 9 - 4
    pw = parzen_weights(torch.tensor([[0.0, 0.5, 1.0, 1.7]]), num_bins=5)
    torch.testing.assert_close(pw.sum(-1), torch.ones(1, 4))
    assert pw.argmax(-1).tolist() == [[0, 2, 4, 4]]
    torch.testing.assert_close(pw[0, 3], pw[0, 2])  # 1.7 is clamped to 1
    assert parzen_weights(torch.rand(1, 3)).shape == (1, 3, 23)  # MONAI's default bin count
    sigma = 0.5 * 0.25
    k = torch.exp(-((torch.linspace(0, 1, 5) - 0.5) ** 2) / (2 * sigma**2))
    torch.testing.assert_close(pw[0, 1], k / k.sum())
    with pytest.raises(ValueError, match=r"^weighted_mi: shapes differ \(1, 4\) vs \(1, 5\)$"):
        weighted_mi(torch.rand(1, 4), torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"^weighted_mi: a sample has zero total weight \(mask covers the whole image\?\)$"):
        weighted_mi(torch.rand(2, 4), torch.rand(2, 4), torch.tensor([[1.0] * 4, [0.0] * 4]))
    a, b = torch.rand(1, 6), torch.rand(1, 6)
    small = torch.tensor([[0.1, 0.2, 0.0, 0.05, 0.1, 0.3]])  # total 0.75 < 1: still a valid weighting
    torch.testing.assert_close(weighted_mi(a, b, small), weighted_mi(a, b, 4 * small))


def test_channelwise_mi_is_the_mean_of_per_channel_mi():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(2, 3, 6, 6, generator=g), torch.rand(2, 3, 6, 6, generator=g)
    b[:, 0] = a[:, 0]  # one strongly dependent channel
    w = torch.ones(2, 1, 6, 6)
    w[1, 0, :2] = 0
    per = torch.stack([weighted_mi(a[:, c], b[:, c], w[:, 0]) for c in range(3)], 1)
    torch.testing.assert_close(channelwise_weighted_mi(a, b, w), per.mean(1))
    torch.testing.assert_close(channelwise_weighted_mi(a, b), torch.stack([weighted_mi(a[:, c], b[:, c])
                                                                           for c in range(3)], 1).mean(1))


def test_histogram_mi_against_sklearn():
    from sklearn.metrics import mutual_info_score

    g = torch.Generator().manual_seed(5)
    a = torch.rand(40, 40, generator=g)
    b = (0.6 * a + 0.4 * torch.rand(40, 40, generator=g)).clamp(0, 1)
    bins = 8
    la, lb = (a * (bins - 1)).round().long().flatten(), (b * (bins - 1)).round().long().flatten()
    assert histogram_mi(a, b, bins=bins) == pytest.approx(mutual_info_score(la, lb), rel=1e-9)
    w = torch.zeros(40, 40)
    w[:, :20] = 1  # weight 0/1 = the left half only
    left = slice(0, 20)
    la2 = (a[:, left] * (bins - 1)).round().long().flatten()
    lb2 = (b[:, left] * (bins - 1)).round().long().flatten()
    assert histogram_mi(a, b, w, bins=bins) == pytest.approx(mutual_info_score(la2, lb2), rel=1e-9)
    assert histogram_mi(a, torch.full_like(a, 0.3), bins=bins) == pytest.approx(0.0, abs=1e-12)
    assert histogram_mi(a, b) == histogram_mi(a, b, bins=32)  # the default bin count
    # values outside [0, 1] are clamped, for either image
    assert histogram_mi(a + 0.5, b, bins=bins) == pytest.approx(histogram_mi((a + 0.5).clamp(0, 1), b, bins=bins))
    assert histogram_mi(a, b + 0.5, bins=bins) == pytest.approx(histogram_mi(a, (b + 0.5).clamp(0, 1), bins=bins))
