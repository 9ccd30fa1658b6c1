"""Pure-tensor tests of the generator losses and the masked MI (fast, no models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from negdpo.generator.losses import (
    LOG2,
    beta_from_diffusers,
    diffusion_dpo_loss,
    fidelity_loss,
    scale_gradient,
    sdpo_lambda,
    training_target,
    x0_from_prediction,
)
from negdpo.generator.mi import mi_hinge, outside_weight, weighted_mi


def _errs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 0.1 for _ in range(4)]


def test_log2_and_other_types_at_equal_policy_and_reference():
    ew, el, _, _ = _errs()
    loss, m = diffusion_dpo_loss(ew, el, ew.clone(), el.clone(), beta=5000)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7) and LOG2 == math.log(2)
    assert m["implicit_acc"] == 0.5 and m["implicit_acc_strict"] == 0.0
    assert diffusion_dpo_loss(ew, el, ew, el, 5000, "hinge")[0].item() == pytest.approx(1.0)
    assert diffusion_dpo_loss(ew, el, ew, el, 5000, "ipo")[0].item() == pytest.approx(1 / (4 * 2500**2), rel=1e-5)


def test_beta_conventions_agree():
    ew, el, rw, rl = _errs(1)
    ours, _ = diffusion_dpo_loss(ew, el, rw, rl, beta=beta_from_diffusers(2500))
    h = (rw - rl) - (ew - el)  # diffusers SD1.5 logits, no 1/2
    theirs = -F.logsigmoid(2500 * h).mean()
    salesforce = -F.logsigmoid(-(5000 / 2) * ((ew - el) - (rw - rl))).mean()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, salesforce)


def test_swap_negates_margin():
    ew, el, rw, rl = _errs(2)
    _, a = diffusion_dpo_loss(ew, el, rw, rl, 5000)
    _, b = diffusion_dpo_loss(el, ew, rl, rw, 5000)
    torch.testing.assert_close(a["margin"], -b["margin"])
    assert (a["implicit_acc"] + b["implicit_acc"]).item() == pytest.approx(1.0)


def test_sdpo_keeps_value_and_scales_only_loser_gradient():
    torch.manual_seed(0)
    pw = torch.randn(2, 4, 8, 8, requires_grad=True)
    pl = torch.randn(2, 4, 8, 8, requires_grad=True)
    tgt = torch.randn(2, 4, 8, 8)
    ew, el = ((pw - tgt) ** 2).mean((1, 2, 3)), ((pl - tgt) ** 2).mean((1, 2, 3))
    rw, rl = ew.detach() + 0.01, el.detach() - 0.01
    lam = torch.tensor(0.3)
    plain, m0 = diffusion_dpo_loss(ew, el, rw, rl, 100)
    safe, m1 = diffusion_dpo_loss(ew, scale_gradient(el, lam), rw, rl, 100)
    assert plain.item() == safe.item() and m0["margin"].item() == m1["margin"].item()
    gw0, gl0 = torch.autograd.grad(plain, [pw, pl], retain_graph=True)
    gw1, gl1 = torch.autograd.grad(safe, [pw, pl])
    torch.testing.assert_close(gw1, gw0)
    torch.testing.assert_close(gl1, lam * gl0)


def test_sdpo_lambda_rules():
    a = torch.randn(1, 4, 8, 8)
    t = torch.zeros_like(a)
    assert sdpo_lambda(a, t, -a, t, mu=0.9).item() == 1.0  # opposed gradients: keep the loser's
    assert sdpo_lambda(a, t, a, t, mu=1.0).item() == 0.0  # mu = 1 removes aligned loser gradient
    lam = sdpo_lambda(a, t, 2 * a, t, mu=0.5)  # (1-mu)|a|^2 / (2|a|^2) = 0.25
    assert lam.item() == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_x0_recovery(ptype):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.tensor([0.9, 0.5, 0.05])
    a, s = abar.sqrt(), (1 - abar).sqrt()
    xt = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    pred = training_target(eps, x0, a, s, ptype)
    torch.testing.assert_close(x0_from_prediction(pred, xt, a, s, ptype), x0, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- masked MI
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
