"""Diffusion-DPO losses, the SDPO winner-preserving safeguard, x0 recovery and the fidelity term.

Beta convention (stated once, used everywhere): **the Salesforce / SDXL convention with the 1/2**,

    z = -(beta / 2) * [(e_theta(w) - e_theta(l)) - (e_ref(w) - e_ref(l))]      loss = -log sigma(z)

with per-sample *mean* squared errors, so beta is in the thousands (5000 is the usual value). The
diffusers SD-1.5 script's ``beta_dpo`` drops the 1/2: its 2500 equals our 5000 (``beta_from_diffusers``).
The implicit reward is r(x) = -(beta/2) (e_theta(x) - e_ref(x)); z = r(w) - r(l) is the margin.

Formulas and sources: docs/method.md#diffusion-dpo, docs/method.md#sdpo, docs/method.md#fidelity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def beta_from_diffusers(beta_dpo: float) -> float:
    """diffusers SD-1.5 ``beta_dpo`` (no 1/2) -> this module's beta (with the 1/2)."""
    return 2.0 * float(beta_dpo)


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float, loss_type: str = "sigmoid"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean Diffusion-DPO loss over pairs and detached metrics.

    Errors are per-pair (B,) tensors, ``w`` = chosen, ``l`` = rejected, each computed with the same t and
    noise. ``beta`` uses the convention with the 1/2 (module docstring). Loss types, with z the margin and
    h = Delta_ref - Delta_theta = 2 z / beta the unscaled log-ratio difference: sigmoid -log sigma(z); hinge
    relu(1 - z); ipo (h - 1/beta)^2, which is IPO's (h - 1/(2 beta'))^2 in diffusers' notation (beta' = beta/2).
    At policy == reference: log 2, 1, 1/beta^2.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got '{loss_type}'")
    ref_err_w, ref_err_l = ref_err_w.detach(), ref_err_l.detach()
    reward_w = -0.5 * beta * (model_err_w - ref_err_w)
    reward_l = -0.5 * beta * (model_err_l - ref_err_l)
    z = reward_w - reward_l
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - z)
    else:
        h = (ref_err_w - ref_err_l) - (model_err_w - model_err_l)
        losses = (h - 1.0 / beta) ** 2
    zd = z.detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/chosen": reward_w.detach().mean(),  # TRL's names (docs/method.md#conventions)
        "rewards/rejected": reward_l.detach().mean(),
        "rewards/margins": zd.mean(),
        "rewards/accuracies": (zd > 0).float().mean(),  # strict: ties count as wrong (TRL)
        "implicit_acc_ties_half": ((zd > 0).float() + 0.5 * (zd == 0).float()).mean(),  # ties count half (diffusers)
        "margin_std": zd.std(unbiased=False),
        "sigma_neg_margin": torch.sigmoid(-zd).mean(),
        "winner_degradation": (model_err_w - ref_err_w).detach().mean(),  # > 0: chosen got worse than ref
        "model_err": 0.5 * (model_err_w.detach().mean() + model_err_l.detach().mean()),
        "ref_err": 0.5 * (ref_err_w.mean() + ref_err_l.mean()),
    }
    return losses.mean(), metrics


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                     outside_gamma: float = 0.0) -> torch.Tensor:
    """Per-sample mean squared error (B,), fp32; optionally mask-weighted.

    With ``weight`` (B,1,h,w; 1 = inside the dilated lesion): e = sum w d^2 / (C sum w) + gamma * the same
    mean over the outside (1 - w). Still a mean, so beta keeps its scale and the loss is still log 2 at init.
    """
    d2 = (pred.float() - target.float()) ** 2
    coef = _error_coefficients(weight, d2.shape, outside_gamma)
    if coef is None:
        return d2.mean(dim=tuple(range(1, d2.ndim)))
    return (coef * d2).sum(dim=tuple(range(1, d2.ndim)))


def _error_coefficients(weight: torch.Tensor | None, shape: torch.Size, outside_gamma: float
                        ) -> torch.Tensor | None:
    """c with per_sample_error = sum c d^2 per sample: w / sum w (+ gamma (1 - w) / sum (1 - w)); None = mean."""
    if weight is None:
        return None
    dims = tuple(range(1, len(shape)))
    w = torch.broadcast_to(weight.float(), shape)
    coef = w / w.sum(dims, keepdim=True).clamp_min(1e-8)
    if outside_gamma > 0:
        wo = 1.0 - w
        coef = coef + outside_gamma * wo / wo.sum(dims, keepdim=True).clamp_min(1e-8)
    return coef


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.float().reshape(-1, *([1] * (like.ndim - 1)))


def noise_coefs(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps t, fp32."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar.sqrt(), (1.0 - abar).sqrt()


def training_target(noise: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """eps for epsilon-prediction, v = a_t eps - s_t x0 for v-prediction."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _bcast(a_t, noise) * noise - _bcast(s_t, noise) * x0
    raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")


def x0_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor,
                       prediction_type: str) -> torch.Tensor:
    """Predicted clean latent: eps-pred (x_t - s_t eps_hat)/a_t; v-pred a_t x_t - s_t v_hat (fp32)."""
    a, s = _bcast(a_t, x_t), _bcast(s_t, x_t)
    if prediction_type == "epsilon":
        return (x_t.float() - s * pred.float()) / a
    if prediction_type == "v_prediction":
        return a * x_t.float() - s * pred.float()
    raise ValueError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")


def sdpo_lambda(pred_w: torch.Tensor, target_w: torch.Tensor, pred_l: torch.Tensor, target_l: torch.Tensor,
                mu: float, weight: torch.Tensor | None = None, outside_gamma: float = 0.0) -> torch.Tensor:
    """SDPO loser-gradient scale in [0, 1] from output-space gradients (no extra backward).

    g_A, g_B = d(batch-mean ``per_sample_error(pred, target, weight, outside_gamma)``)/d(pred) of the winner /
    loser, in closed form: 2 c (pred - target) / B with the per-sample coefficients c of that error (the
    common factor 2/B cancels). ``weight`` is the pair's shared mask weight (one row per pair). Paired
    coordinate-wise (meaningful because both members share t and noise):
    lambda = clip((1-mu)|g_A|^2 / <g_B,g_A>, 0, 1) if <g_B,g_A> > 0 else 1, so that, to first order, the
    winner error decreases at rate >= mu |g_A|^2.
    """
    with torch.no_grad():
        g_a = pred_w.float() - target_w.float()
        g_b = pred_l.float() - target_l.float()
        coef = _error_coefficients(weight, g_a.shape, outside_gamma)
        if coef is not None:
            g_a, g_b = g_a * coef, g_b * coef
        dot = (g_a * g_b).sum()
        if dot <= 0:
            return torch.ones((), device=pred_w.device)
        return ((1.0 - mu) * (g_a * g_a).sum() / dot).clamp(0.0, 1.0)


def scale_gradient(x: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Straight-through: same forward value as ``x``, gradient scaled by ``lam``."""
    return x.detach() + lam * (x - x.detach())


def fidelity_loss(x0_hat: torch.Tensor, source: torch.Tensor, weight: torch.Tensor,
                  gate: torch.Tensor | None = None, x0_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Outside-mask L1 between the predicted clean latent and the source latent (weights 1 = outside).

    With ``x0_ref`` it is reference-relative, relu(L1_policy - L1_ref) per sample: 0 at init, so the total
    loss stays log 2 there, and it only penalises the policy drifting further from the source than the ref.
    """
    w = weight.float()
    dims = tuple(range(1, x0_hat.ndim))

    def l1(x: torch.Tensor) -> torch.Tensor:
        d = (x.float() - source.detach().float()).abs()
        wb = torch.broadcast_to(w, d.shape)
        return (wb * d).sum(dims) / wb.sum(dims).clamp_min(1e-8)

    per = l1(x0_hat)
    if x0_ref is not None:
        with torch.no_grad():
            ref = l1(x0_ref.detach())
        per = F.relu(per - ref)
    if gate is not None:
        per = per * gate.float()
    return per.mean()
