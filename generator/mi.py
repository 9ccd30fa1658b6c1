"""Masked (weighted) Parzen mutual information, MONAI-compatible on an all-ones mask.

MONAI's ``GlobalMutualInformationLoss`` has no mask argument, and masking by multiplying both images
by the mask adds a shared spike of zeros that inflates MI and rewards matching the artificial zeros.
Here every pixel carries a weight ``w_i`` (1 = outside the dilated lesion, 0 = ignore):

    p_a(k)   = sum_i w_i phi_k(a_i) / sum_i w_i          (phi = Gaussian kernel normalised over bins)
    p_ab(k,l)= sum_i w_i phi_k(a_i) phi_l(b_i) / sum_i w_i
    I_w      = sum_kl p_ab log((p_ab + nr) / (p_a p_b + dr) + dr)      (MONAI's smoothing constants)

so pixels with w = 0 have exactly zero influence on the value and exactly zero gradient, and w = 1
reproduces MONAI's estimate. Inputs are clamped to [0, 1] (fixed normalisation, never per-batch min/max)
and everything runs in fp32 (fp16 underflows in the joint histogram, MONAI#7622).

Formulas and sources: docs/method.md#masked-mi.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def parzen_weights(x: torch.Tensor, num_bins: int = 23, sigma_ratio: float = 0.5) -> torch.Tensor:
    """(B, N) values in [0,1] -> (B, N, K) Gaussian kernel weights, normalised over the K bins."""
    centers = torch.linspace(0.0, 1.0, num_bins, device=x.device, dtype=torch.float32)
    sigma = sigma_ratio * (1.0 / (num_bins - 1))
    pre = 1.0 / (2.0 * sigma**2)
    x = x.float().clamp(0.0, 1.0).unsqueeze(-1)
    w = torch.exp(-pre * (x - centers) ** 2)
    return w / w.sum(dim=-1, keepdim=True)


def weighted_mi(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None, *, num_bins: int = 23,
                sigma_ratio: float = 0.5, smooth_nr: float = 1e-7, smooth_dr: float = 1e-7) -> torch.Tensor:
    """Per-sample weighted Parzen MI (nats) between ``a`` and ``b`` (shape B[...]; values in [0,1]).

    ``weight`` broadcastable to ``a`` (e.g. B,1,H,W for B,C,H,W images) with values >= 0; None = all ones.
    All non-batch dims are pooled into one sample set, as in MONAI. Returns a (B,) fp32 tensor.
    """
    if a.shape != b.shape:
        raise ValueError(f"weighted_mi: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    bsz = a.shape[0]
    wa = parzen_weights(a.reshape(bsz, -1), num_bins, sigma_ratio)
    wb = parzen_weights(b.reshape(bsz, -1), num_bins, sigma_ratio)
    if weight is None:
        w = torch.ones(wa.shape[:2], device=a.device, dtype=torch.float32)
    else:
        w = torch.broadcast_to(weight.float(), a.shape).reshape(bsz, -1)
    total = w.sum(dim=1)
    if bool((total <= 0).any()):
        raise ValueError("weighted_mi: a sample has zero total weight (mask covers the whole image?)")
    wn = (w / total[:, None]).unsqueeze(-1)  # (B, N, 1), sums to 1 over N
    pa = (wn * wa).sum(dim=1)  # (B, K)
    pb = (wn * wb).sum(dim=1)
    pab = torch.bmm((wn * wa).transpose(1, 2), wb)  # (B, K, K)
    papb = pa.unsqueeze(2) * pb.unsqueeze(1)
    return torch.sum(pab * torch.log((pab + smooth_nr) / (papb + smooth_dr) + smooth_dr), dim=(1, 2))


def channelwise_weighted_mi(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None,
                            **kwargs) -> torch.Tensor:
    """(B,C,H,W) -> (B,) mean over channels of the per-channel weighted MI (latent channels differ in meaning)."""
    bsz, ch = a.shape[:2]
    w = None if weight is None else torch.broadcast_to(weight, a.shape).reshape(bsz * ch, *a.shape[2:])
    mi = weighted_mi(a.reshape(bsz * ch, *a.shape[2:]), b.reshape(bsz * ch, *b.shape[2:]), w, **kwargs)
    return mi.view(bsz, ch).mean(dim=1)


def latents_to_unit(latents: torch.Tensor, clip: float = 4.0) -> torch.Tensor:
    """Scaled VAE latents -> [0,1] with FIXED constants (clamp to +-clip), fp32."""
    return ((latents.float().clamp(-clip, clip) + clip) / (2.0 * clip))


def outside_weight(mask: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """Weights 1 outside the lesion mask dilated by ``dilate`` px (square), 0 inside. mask: (B,1,H,W) in {0,1}."""
    m = mask.float()
    if dilate > 0:
        m = F.max_pool2d(m, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return 1.0 - m


def mi_hinge(x0_policy: torch.Tensor, x0_ref: torch.Tensor, source: torch.Tensor, weight: torch.Tensor,
             gate: torch.Tensor | None = None, *, clip: float = 4.0, num_bins: int = 23) -> tuple[torch.Tensor, dict]:
    """Reference-relative masked-MI hinge: mean_b gate_b * relu(I_w(x0_ref, src) - I_w(x0_policy, src)).

    Latents (B,C,h,w) are mapped to [0,1] with fixed constants; ``x0_ref`` is detached. Exactly 0 when the
    policy equals the reference (step 0), so it only penalises losing anatomy outside the lesion.
    ``gate`` (B,) weights samples by timestep (e.g. abar_t or t < t_max); None = 1.
    """
    src = latents_to_unit(source.detach(), clip)
    mi_pol = channelwise_weighted_mi(latents_to_unit(x0_policy, clip), src, weight, num_bins=num_bins)
    with torch.no_grad():
        mi_ref = channelwise_weighted_mi(latents_to_unit(x0_ref.detach(), clip), src, weight, num_bins=num_bins)
    hinge = F.relu(mi_ref - mi_pol)
    if gate is not None:
        hinge = hinge * gate.float()
    return hinge.mean(), {"mi/policy": mi_pol.detach().mean(), "mi/ref": mi_ref.mean(),
                          "mi/hinge": hinge.detach().mean()}


def histogram_mi(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None, bins: int = 32) -> float:
    """Hard-histogram (plug-in) weighted MI of two [0,1] images, for monitoring only (not differentiable)."""
    w = torch.ones_like(a, dtype=torch.float32) if weight is None else torch.broadcast_to(weight.detach().float(), a.shape)
    a, b, w = a.detach().float().clamp(0, 1).flatten(), b.detach().float().clamp(0, 1).flatten(), w.flatten()
    ia = (a * (bins - 1)).round().long()
    ib = (b * (bins - 1)).round().long()
    joint = torch.zeros(bins * bins, dtype=torch.float64).index_add_(0, ia * bins + ib, w.double()).view(bins, bins)
    joint = joint / joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa * pb)[nz]).log()).sum())
