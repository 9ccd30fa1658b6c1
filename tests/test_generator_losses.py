"""Pure-tensor tests of the generator losses (fast, no models); the masked MI terms: test_generator_mi.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from negdpo.generator.losses import (
    LOG2,
    beta_from_diffusers,
    diffusion_dpo_loss,
    noise_coefs,
    per_sample_error,
    scale_gradient,
    sdpo_lambda,
    training_target,
    x0_from_prediction,
)


def _errs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) * 0.1 for _ in range(4)]


def test_log2_and_other_types_at_equal_policy_and_reference():
    ew, el, _, _ = _errs()
    loss, m = diffusion_dpo_loss(ew, el, ew.clone(), el.clone(), beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert LOG2 == pytest.approx(loss.item(), abs=1e-7)  # the constant trainers compare the step-0 loss with
    assert m["implicit_acc_ties_half"] == 0.5 and m["rewards/accuracies"] == 0.0  # ties: half vs wrong (TRL)
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
    expect = {"loss": sig.item(), "margin_std": float(z.std(unbiased=False)),
              "implicit_acc_ties_half": 1.5 / 3, "rewards/chosen": rew_w.mean().item(),
              "rewards/rejected": rew_l.mean().item(), "rewards/margins": sum(zs) / 3, "rewards/accuracies": 1 / 3,
              "sigma_neg_margin": torch.sigmoid(-z).mean().item(),
              "winner_degradation": (ew - rw).mean().item(), "model_err": ((ew + el) / 2).mean().item(),
              "ref_err": ((rw + rl) / 2).mean().item()}
    assert set(m) == set(expect)  # each quantity under one name (no margin / implicit_acc_strict copies)
    for k, v in expect.items():
        assert m[k].item() == pytest.approx(v, abs=1e-7), k  # accuracies are float32 means
    for k in ("rewards/chosen", "rewards/margins", "model_err", "winner_degradation"):
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
    torch.testing.assert_close(a["rewards/margins"], -b["rewards/margins"])
    assert (a["implicit_acc_ties_half"] + b["implicit_acc_ties_half"]).item() == pytest.approx(1.0)


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
    assert plain.item() == safe.item() and m0["rewards/margins"].item() == m1["rewards/margins"].item()
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


def test_heldout_records_of_old_runs_read_under_the_new_name():
    """A ``heldout_before.json`` written before the rename (strict accuracy as ``implicit_acc``) is read with
    the strict value under ``implicit_acc_strict``; a current record passes unchanged."""
    from negdpo.generator.objective import heldout_record

    old = {"implicit_acc": 0.25, "implicit_acc_ties_half": 0.5, "margin_mean": 0.0, "n": 4}
    assert heldout_record(old) == {"implicit_acc_strict": 0.25, "implicit_acc_ties_half": 0.5, "margin_mean": 0.0,
                                   "n": 4}
    new = {"implicit_acc_strict": 0.75, "implicit_acc_ties_half": 0.75, "margin_mean": 1.0, "n": 4}
    assert heldout_record(dict(new)) == new
