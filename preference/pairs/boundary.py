"""Latent-boundary negatives: push a positive across a lesion classifier's decision boundary in VAE space.

    z_pos = E(x_pos);  z_neg = z_pos + delta * m_lat;  x_neg = paste(D(z_neg), x_pos, m_px)

``delta`` is optimised (Adam, a few steps) so that the classifier's lesion logit on ``x_neg`` falls
just past the boundary (``logit <= -margin``: hinge, so it stops moving once across) while staying
small (L2 penalty, and a projection to RMS(delta) <= eps x RMS(z_pos) on the mask). ``m_lat`` is
the pixel mask taken to latent resolution and dilated by ``dilate`` latents; decoded pixels are
pasted back only inside the pixel mask, so everything outside is the source exactly.

The classifier is any ``logit_fn(x) -> (B,)`` on images in [0, 1] (B, 3, H, W), differentiable:
the CLIP zero-shot lesion logit (:func:`negdpo.preference.pairs.judges.clip_lesion_logit`) or a logistic probe on
the CLIP image embedding (:func:`fit_probe`). Recorded as its own ``gen_model`` (``latent_boundary:...``).

Formulas and sources: docs/method.md#latent-boundary-negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LogitFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BoundaryConfig:
    steps: int = 20
    lr: float = 0.02  # Adam step, in units of RMS(z_pos)
    margin: float = 0.5  # target: lesion logit <= -margin
    eps: float = 0.5  # max RMS(delta) / RMS(z_pos) on the latent mask
    reg: float = 0.1  # L2 penalty on delta
    dilate: int = 1  # latent pixels
    init_std: float = 0.05  # seeded random start (x RMS(z_pos)), so K candidates differ


def dilated_latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], dilate: int) -> torch.Tensor:
    """(B, 1, H, W) bool pixel mask -> (B, 1, h, w) float latent mask (any overlap, then dilated)."""
    m = F.adaptive_max_pool2d(mask.float(), latent_hw)
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m


def _to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    arrs = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in images]
    x = torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)


class LatentBoundary:
    """Candidate source; ``__call__`` mirrors ``negdpo.generator.sample.inpaint``'s I/O (float [0,1], input shape)."""

    def __init__(self, vae, size: int, cfg: BoundaryConfig = BoundaryConfig()) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.size = int(size)
        self.cfg = cfg
        self.first_logits: np.ndarray | None = None  # classifier logit at the start (delta = random init)
        self.last_logits: np.ndarray | None = None  # ... and of each output (after optimisation)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(z / self.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)

    def __call__(self, images: list[np.ndarray], masks: list[np.ndarray], seeds: list[int],
                 logit_fn: LogitFn) -> list[np.ndarray]:
        cfg = self.cfg
        dev = next(self.vae.parameters()).device
        dtype = next(self.vae.parameters()).dtype
        x = _to_tensor(images, self.size).to(dev, dtype)
        m_px = torch.from_numpy(np.stack([np.asarray(m, bool) for m in masks]))[:, None].float()
        m_px = F.interpolate(m_px, size=(self.size, self.size), mode="nearest").to(dev, dtype)
        with torch.no_grad():
            z0 = self.vae.encode(x * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor
        m_lat = dilated_latent_mask(m_px > 0, tuple(z0.shape[-2:]), cfg.dilate).to(dtype)
        area = m_lat.sum((1, 2, 3), keepdim=True).clamp_min(1) * z0.shape[1]
        z_rms = ((z0 * m_lat) ** 2).sum((1, 2, 3), keepdim=True).div(area).sqrt().clamp_min(1e-3)
        noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(dev, dtype)
        # optimise u = delta / RMS(z_pos) on the latent mask: step sizes are relative to the latent scale
        u = (noise * cfg.init_std * m_lat).requires_grad_(True)
        opt = torch.optim.Adam([u], lr=cfg.lr)

        def render(v: torch.Tensor) -> torch.Tensor:
            return self._decode(z0 + v * z_rms * m_lat) * m_px + x * (1 - m_px)

        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            logit = logit_fn(render(u))
            if step == 0:
                self.first_logits = logit.detach().float().cpu().numpy()
            u_rms2 = ((u * m_lat) ** 2).sum((1, 2, 3)) / area.flatten()
            loss = (F.relu(logit + cfg.margin) + cfg.reg * u_rms2).sum()
            loss.backward()
            opt.step()
            with torch.no_grad():  # project onto the allowed set: inside the mask, RMS(u) <= eps
                u.mul_(m_lat)
                u_rms = (u ** 2).sum((1, 2, 3), keepdim=True).div(area).sqrt()
                u.mul_(torch.clamp(cfg.eps / u_rms.clamp_min(1e-12), max=1.0))
        delta = u
        with torch.no_grad():
            out = render(delta)
            self.last_logits = logit_fn(out).float().cpu().numpy()
        outs = []
        for i, (img, m) in enumerate(zip(images, masks)):
            o = out[i].float().cpu()
            h, w = img.shape[:2]
            if o.shape[-2:] != (h, w):
                o = F.interpolate(o[None], size=(h, w), mode="bicubic", antialias=True)[0].clamp(0, 1)
            o = o.permute(1, 2, 0).numpy()
            o = o.mean(-1) if img.ndim == 2 else o
            keep = np.asarray(m, bool) if img.ndim == 2 else np.asarray(m, bool)[..., None]
            outs.append(np.where(keep, o, img).astype(np.float32))
        return outs


# -- classifiers -----------------------------------------------------------------------------------
def zero_shot_logit_fn(model, text_features: torch.Tensor) -> LogitFn:
    """CLIP zero-shot lesion logit; ``text_features`` (B, 2, D) = [healthy, lesion] per image."""
    from negdpo.preference.pairs.judges import clip_lesion_logit

    return lambda x: clip_lesion_logit(model, x, text_features)


def _embed(model, x: torch.Tensor) -> torch.Tensor:
    from negdpo.core.models.clip import CLIP_MEAN, CLIP_STD

    size = getattr(model.visual, "image_size", (224, 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return F.normalize(model.encode_image((x - mean) / std), dim=-1)


def fit_probe(model, lesion_images: list[np.ndarray], healthy_images: list[np.ndarray], c: float = 1.0) -> LogitFn:
    """Logistic probe on CLIP image embeddings (lesion = 1); returns a differentiable logit function."""
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        emb = torch.cat([_embed(model, _to_tensor([im], im.shape[0])) for im in lesion_images + healthy_images])
    y = np.r_[np.ones(len(lesion_images)), np.zeros(len(healthy_images))]
    clf = LogisticRegression(C=c, max_iter=1000).fit(emb.numpy(), y)
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)
    b = float(clf.intercept_[0])
    return lambda x: _embed(model, x) @ w.to(x.device) + b
