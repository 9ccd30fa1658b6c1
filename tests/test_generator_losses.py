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
    noise_coefs,
    per_sample_error,
    scale_gradient,
    sdpo_lambda,
    training_target,
    x0_from_prediction,
)
from negdpo.generator.mi import (
    channelwise_weighted_mi,
    histogram_mi,
    latents_to_unit,
    mi_hinge,
    outside_weight,
    parzen_weights,
    weighted_mi,
)


def _errs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 0.1 for _ in range(4)]


def test_log2_and_other_types_at_equal_policy_and_reference():
    ew, el, _, _ = _errs()
    loss, m = diffusion_dpo_loss(ew, el, ew.clone(), el.clone(), beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert LOG2 == pytest.approx(loss.item(), abs=1e-7)  # the constant trainers compare the step-0 loss with
    assert m["implicit_acc"] == 0.5 and m["implicit_acc_strict"] == 0.0
    assert diffusion_dpo_loss(ew, el, ew, el, 5000, "hinge")[0].item() == pytest.approx(1.0)
    assert diffusion_dpo_loss(ew, el, ew, el, 5000, "ipo")[0].item() == pytest.approx(1 / (4 * 2500**2), rel=1e-5)
    with pytest.raises(ValueError, match=r"^loss_type must be one of \('sigmoid', 'hinge', 'ipo'\), got 'dpo'$"):
        diffusion_dpo_loss(ew, el, ew, el, 5000, "dpo")


def test_loss_types_and_metrics_against_hand_formulas():
    """Away from the reference: each loss type and every metric against its formula written out here."""
    ew, el = torch.tensor([0.30, 0.10, 0.20], dtype=torch.float64), torch.tensor([0.25, 0.12, 0.20], dtype=torch.float64)
    rw, rl = torch.tensor([0.28, 0.10, 0.21], dtype=torch.float64), torch.tensor([0.26, 0.11, 0.21], dtype=torch.float64)
    beta = 40.0
    rew_w, rew_l = -beta / 2 * (ew - rw), -beta / 2 * (el - rl)
    z = rew_w - rew_l
    h = (rw - rl) - (ew - el)
    torch.testing.assert_close(z, beta / 2 * h)
    sig, m = diffusion_dpo_loss(ew, el, rw, rl, beta)
    torch.testing.assert_close(sig, torch.log1p(torch.exp(-z)).mean())
    torch.testing.assert_close(diffusion_dpo_loss(ew, el, rw, rl, beta, "hinge")[0], torch.clamp(1 - z, min=0).mean())
    torch.testing.assert_close(diffusion_dpo_loss(ew, el, rw, rl, beta, "ipo")[0], ((h - 1 / beta) ** 2).mean())
    zs = z.tolist()  # [-0.6, 0.2, 0.0]: one win, one loss, one tie
    assert zs == pytest.approx([-0.6, 0.2, 0.0], abs=1e-9)
    expect = {"loss": sig.item(), "margin": sum(zs) / 3, "margin_std": float(z.std(unbiased=False)),
              "implicit_acc": 1.5 / 3, "implicit_acc_strict": 1 / 3, "rewards/chosen": rew_w.mean().item(),
              "rewards/rejected": rew_l.mean().item(), "rewards/margins": sum(zs) / 3, "rewards/accuracies": 1 / 3,
              "sigma_neg_margin": torch.sigmoid(-z).mean().item(),
              "winner_degradation": (ew - rw).mean().item(), "model_err": ((ew + el) / 2).mean().item(),
              "ref_err": ((rw + rl) / 2).mean().item()}
    assert set(m) == set(expect)
    for k, v in expect.items():
        assert m[k].item() == pytest.approx(v, abs=1e-7), k  # accuracies are float32 means
    for k in ("rewards/chosen", "margin", "model_err", "winner_degradation"):
        assert not m[k].requires_grad


def test_reference_errors_get_no_gradient():
    ew, el, rw, rl = (x.clone().requires_grad_(True) for x in _errs(5))
    loss, _ = diffusion_dpo_loss(ew, el, rw, rl, 5000)
    loss.backward()
    assert rw.grad is None and rl.grad is None
    assert ew.grad.abs().sum() > 0 and el.grad.abs().sum() > 0


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
    assert sdpo_lambda(a, t, torch.zeros_like(a), t, mu=0.9).item() == 1.0  # orthogonal (dot 0): keep it too
    assert sdpo_lambda(a, t, a, t, mu=1.0).item() == 0.0  # mu = 1 removes aligned loser gradient
    lam = sdpo_lambda(a, t, 2 * a, t, mu=0.5)  # (1-mu)|a|^2 / (2|a|^2) = 0.25
    assert lam.item() == pytest.approx(0.25, rel=1e-5)
    assert sdpo_lambda(a, t, 0.5 * a, t, mu=0.2).item() == 1.0  # (0.8)/(0.5) = 1.6, clipped to 1
    assert sdpo_lambda(a, t, a, t, mu=1.5).item() == 0.0  # negative ratio clipped to 0
    assert sdpo_lambda(t, t, t, t, mu=0.5).item() == 1.0  # both errors zero (0/0): keep the loser's gradient


def _autograd_lambda(pw, tw, pl, tl, mu, weight, gamma):
    """The SDPO rule written directly on autograd gradients of the batch-mean per-sample error."""
    gs = []
    for p, tgt in ((pw, tw), (pl, tl)):
        x = p.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(per_sample_error(x, tgt, weight, gamma).mean(), x)
        gs.append(g.double())
    g_a, g_b = gs
    dot = (g_a * g_b).sum()
    return 1.0 if dot <= 0 else float(((1 - mu) * (g_a * g_a).sum() / dot).clamp(0, 1))


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_sdpo_lambda_equals_autograd_lambda_with_mask_weight(gamma):
    """Defect: with a mask weight the closed form dropped the per-sample 1/sum(w) and the outside term."""
    g = torch.Generator().manual_seed(3)
    pw, tw = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(2))
    k = torch.tensor([3.0, 1.0, 0.5]).view(3, 1, 1, 1)  # loser error aligned with the winner's, per-sample scale
    pl = tw + k * (pw - tw) + 0.3 * torch.randn(3, 4, 8, 8, generator=g)
    weight = torch.zeros(3, 1, 8, 8)
    weight[0, :, 1:3, 1:3] = 1  # very different lesion areas per sample: 4, 25, 48 pixels
    weight[1, :, 2:7, 2:7] = 1
    weight[2, :, 0:6, 0:8] = 1
    tl = tw  # same target (same noise) for both members
    for mu in (0.1, 0.5):
        ours = sdpo_lambda(pw, tw, pl, tl, mu, weight, gamma).item()
        assert 0.0 < ours < 1.0
        assert ours == pytest.approx(_autograd_lambda(pw, tw, pl, tl, mu, weight, gamma), rel=1e-4, abs=1e-6)
    assert sdpo_lambda(pw, tw, pl, tl, 0.3).item() == pytest.approx(
        _autograd_lambda(pw, tw, pl, tl, 0.3, None, 0.0), rel=1e-4)
    assert sdpo_lambda(pw, tw, pl, tl, 0.3, weight).item() == sdpo_lambda(pw, tw, pl, tl, 0.3, weight, 0.0).item()


def test_per_sample_error_hand_values():
    pred = torch.zeros(2, 2, 2, 2)
    target = torch.arange(16, dtype=torch.float32).view(2, 2, 2, 2)
    d2 = target**2
    torch.testing.assert_close(per_sample_error(pred, target), d2.flatten(1).mean(1))
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 0.0]]]])  # 1 and 3 pixels inside
    inside0, outside0 = (0 + 16) / 2, (1 + 4 + 9 + 25 + 36 + 49) / 6
    inside1 = (64 + 81 + 100 + 144 + 169 + 196) / 6
    outside1 = (121 + 225) / 2
    torch.testing.assert_close(per_sample_error(pred, target, w), torch.tensor([inside0, inside1]))
    torch.testing.assert_close(per_sample_error(pred, target, w, 0.5),
                               torch.tensor([inside0 + 0.5 * outside0, inside1 + 0.5 * outside1]))
    torch.testing.assert_close(per_sample_error(pred, target, w, -1.0), per_sample_error(pred, target, w))
    empty = torch.zeros(2, 1, 2, 2)  # no lesion: the inside term is 0 (clamped denominator), no NaN
    torch.testing.assert_close(per_sample_error(pred, target, empty, 1.0), d2.flatten(1).mean(1))


def test_noise_coefs_and_prediction_type_checks():
    abar = torch.tensor([0.99, 0.64, 0.25, 0.01])
    a, s = noise_coefs(abar, torch.tensor([1, 3, 2]))
    torch.testing.assert_close(a, torch.tensor([0.8, 0.1, 0.5]))
    torch.testing.assert_close(s, torch.tensor([0.6, 0.99**0.5, 0.75**0.5]))
    x = torch.zeros(1, 1, 2, 2)
    msg = r"^unsupported prediction_type 'sample' \(epsilon or v_prediction\)$"
    with pytest.raises(ValueError, match=msg):
        training_target(x, x, a[:1], s[:1], "sample")
    with pytest.raises(ValueError, match=msg):
        x0_from_prediction(x, x, a[:1], s[:1], "sample")


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
