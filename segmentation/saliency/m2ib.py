"""M2IB saliency (Wang et al. 2023, as used by MedCLIP-SAMv2), batched over images.

Bottleneck on the residual stream after block ``layer`` of the vision tower, one parameter tensor
alpha (T x D) per image, initialised to ``init`` (5.0). With lambda = sigmoid(alpha):
    z = lambda * x + (1 - lambda) * eps,  eps ~ N(0, 1), ``samples`` fresh draws per step;
    capacity C = -1/2 (1 + ln s2 - mu^2 - s2), mu = lambda * x, s2 = (1 - lambda)^2 (KL to N(0,1));
    loss_b = beta * mean_{t,c} C - mean_samples cos(f_text_b, f_img(z)), cosine eps 1e-6 on the
    unnormalised projections. Adam(lr=1.0, betas (0.9, 0.999), eps 1e-8), ``steps`` (10) updates.
Read-out (``readout``): ``"capacity"`` (MedCLIP-SAMv2) -- capacity of the last forward (lambda after steps-1 updates), summed over channels, CLS
dropped, patch grid -> bilinear to the crop -> min-max -> scan frame (see ``common``). The capacity
holds (lambda x)^2, so a token's score grows with its activation norm whatever the prompt; ``"lambda"``
(a departure, off by default) reads the kept share sigmoid(alpha) averaged over channels instead, which
does not scale with the token's norm (dark lesions have low-norm tokens).

Batching: the tokens up to the bottleneck are computed once without gradients; only the later blocks
run in the loop, for all images x samples at once. The summed (not averaged) per-image losses make
each alpha's gradient exactly that of a one-image run, Adam is elementwise, and every image draws its
noise from its own generator seeded with ``derive_seed(seed, image name)`` -- so an image's map does
not depend on which images share its batch (up to float rounding of batched matmuls).
``vvar`` of the public code has no effect there and is not an option here.

Target (``target``): ``"prompt"`` (MedCLIP-SAMv2) is the prompt's embedding. ``"contrast"`` (a departure
from MedCLIP-SAMv2, off by default) is the unit prompt embedding minus the unit embedding of the healthy
report of the scan's modality (``negdpo.core.prompts.HEALTHY_TEXT``): the bottleneck then keeps what makes
the image match *this report rather than a normal scan of the same kind*, not what makes it match the modality --
a small CLIP's prompt embeddings are dominated by their shared modality direction, which gives the same
map for any prompt. An irrelevant prompt minus the healthy report points nowhere in particular, so the
paired prompt gap shows whether the map became prompt-specific.

Formulas and sources: docs/method.md#m2ib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.config import derive_seed
from negdpo.core.prompts import default_healthy_text

from .base import SaliencyContext, register
from .common import (
    embed_from,
    eval_mode,
    grids_to_frames,
    input_size,
    num_blocks,
    patch_grid,
    preprocess_batch,
    text_features,
    tokens_through,
)

#: The one default of M2IB's beta per modality (the scan file-name prefix before the first ``_``, as the
#: phantoms are named): the public MedCLIP-SAMv2 zero-shot scripts use 2.0 for brain MRI and 1.0 for
#: breast ultrasound; any other modality gets ``DEFAULT_BETA``. An explicit ``beta`` overrides it.
BETA_BY_MODALITY = {"mri": 2.0, "brain": 2.0, "us": 1.0, "breast": 1.0}
DEFAULT_BETA = 1.0


def modality_beta(name: str) -> float:
    """The default beta of a scan from its file name (``mri_0003_1.png`` -> 2.0); ``DEFAULT_BETA`` otherwise."""
    return BETA_BY_MODALITY.get(name.split("_", 1)[0].lower(), DEFAULT_BETA)


@dataclass
class M2IBConfig:
    """``layer`` None = ``num_blocks - 3`` (block 9 of 12 as in the public brain/breast scripts);
    ``beta`` None = the per-modality default (``BETA_BY_MODALITY``)."""

    layer: int | None = None
    beta: float | None = None
    steps: int = 10
    lr: float = 1.0
    samples: int = 10
    init: float = 5.0
    target: str = "prompt"  # "prompt" | "contrast" (module doc)
    readout: str = "capacity"  # "capacity" (MedCLIP-SAMv2) | "lambda": mean kept share sigmoid(alpha) per token


def capacity(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(lambda x, (1-lambda)^2) || N(0, 1) ), lambda = sigmoid(alpha); stable in alpha."""
    log_var = 2.0 * F.logsigmoid(-alpha)
    mu = torch.sigmoid(alpha) * x
    return -0.5 * (1.0 + log_var - mu.pow(2) - log_var.exp())


def resolve_layer(visual, layer: int | None) -> int:
    n = num_blocks(visual)
    layer = max(n - 3, 0) if layer is None else layer
    if not 0 <= layer < n:
        raise ValueError(f"M2IB layer {layer} out of range for a vision tower with {n} blocks (0..{n - 1})")
    return layer


def m2ib_grids(model, images: torch.Tensor, text_feats: torch.Tensor, seeds: Sequence[int],
               cfg: M2IBConfig = M2IBConfig(), betas: Sequence[float] | None = None) -> torch.Tensor:
    """Capacity score per patch, (B, grid_h, grid_w), for a preprocessed image batch.

    ``text_feats`` (B, E): the prompt embedding of each image; ``seeds``: one noise seed per image;
    ``betas``: one beta per image (default ``cfg.beta``, or ``DEFAULT_BETA`` when that is None). The model
    runs in eval mode (its mode is restored after).
    """
    visual = model.visual
    layer = resolve_layer(visual, cfg.layer)
    gh, gw, prefix = patch_grid(visual, tuple(images.shape[-2:]))
    device = images.device
    if len(seeds) != images.shape[0] or text_feats.shape[0] != images.shape[0]:
        raise ValueError("need one text feature and one seed per image")
    if betas is None:
        betas = [DEFAULT_BETA if cfg.beta is None else cfg.beta] * images.shape[0]
    if len(betas) != images.shape[0]:
        raise ValueError("need one beta per image")
    beta = torch.tensor([float(v) for v in betas], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    with eval_mode(model):
        try:
            cap_last, x, alpha = _optimise(visual, images, text_feats, seeds, cfg, layer, beta)
        finally:
            for p in params:
                p.requires_grad_(True)
    b = images.shape[0]
    if cfg.readout == "lambda":  # the alpha of the last forward, as the capacity read-out uses
        return torch.sigmoid(alpha[:, prefix:]).mean(-1).reshape(b, gh, gw)
    if cfg.readout != "capacity":
        raise ValueError(f"unknown M2IB readout '{cfg.readout}' (use 'capacity' or 'lambda')")
    if cap_last is None:  # steps == 0: capacity at init
        cap_last = capacity(x, torch.full_like(x, cfg.init))
    return cap_last[:, prefix:].sum(-1).reshape(b, gh, gw)


def _optimise(visual, images: torch.Tensor, text_feats: torch.Tensor, seeds: Sequence[int], cfg: M2IBConfig,
              layer: int, beta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The bottleneck optimisation; returns (capacity of the last forward or None, the tokens at ``layer``,
    the alpha of the last forward)."""
    device = images.device
    with torch.no_grad():
        x = tokens_through(visual, images, layer)  # (B, T, D), computed once
    b, t, d = x.shape
    s = cfg.samples
    alpha = torch.full_like(x, cfg.init).requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    gens = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    tf = text_feats.detach().float()[:, None, :]
    cap_last, alpha_last = None, alpha.detach().clone()
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        eps = torch.stack([torch.randn((s, t, d), generator=g, device=device) for g in gens])
        lam, std = torch.sigmoid(alpha)[:, None], torch.sigmoid(-alpha)[:, None]
        z = (lam * x[:, None] + std * eps).reshape(b * s, t, d)
        feats = embed_from(visual, z, layer + 1).reshape(b, s, -1)
        cos = F.cosine_similarity(feats, tf, dim=-1, eps=1e-6)  # (B, S)
        cap = capacity(x, alpha)  # noise-free: the same for every sample
        loss = (beta * cap.mean(dim=(1, 2)) - cos.mean(dim=1)).sum()
        loss.backward()
        cap_last, alpha_last = cap.detach(), alpha.detach().clone()
        opt.step()
    return cap_last, x, alpha_last


def healthy_prompt(name: str) -> str:
    """The healthy report of a scan's modality (file-name prefix), for ``target="contrast"``."""
    try:
        return default_healthy_text(name, strict=True)
    except ValueError as err:
        raise ValueError(f"M2IB target 'contrast' needs a known modality prefix in the scan name: {err}") from None


def target_features(model, tokenizer, prompts: Sequence[str], names: Sequence[str], target: str,
                    device) -> torch.Tensor:
    """M2IB's text target per image: the prompt embedding, or (``contrast``) unit prompt - unit healthy report."""
    tf = text_features(model, tokenizer, prompts, device)
    if target == "prompt":
        return tf
    if target != "contrast":
        raise ValueError(f"unknown M2IB target '{target}' (use 'prompt' or 'contrast')")
    hf = text_features(model, tokenizer, [healthy_prompt(n) for n in names], device)
    return F.normalize(tf.float(), dim=-1) - F.normalize(hf.float(), dim=-1)


def image_seeds(names: Sequence[str], seed: int) -> list[int]:
    return [derive_seed("m2ib", name, base=seed) for name in names]


@register("m2ib")
def m2ib(ctx: SaliencyContext, scans: Sequence, prompts: Sequence[str]) -> list[np.ndarray]:
    """Options (``ctx.options``): layer, beta (None = per modality), steps, lr, samples, target (``M2IBConfig``)."""
    if ctx.clip is None:
        raise ValueError("m2ib needs a CLIP model")
    model, preprocess, tokenizer = ctx.clip
    keys = M2IBConfig.__dataclass_fields__
    cfg = M2IBConfig(**{k: v for k, v in ctx.options.items() if k in keys and v is not None})
    images = preprocess_batch([s.image for s in scans], preprocess, ctx.device)
    betas = [modality_beta(s.name) if cfg.beta is None else cfg.beta for s in scans]
    with eval_mode(model):
        tf = target_features(model, tokenizer, prompts, [s.name for s in scans], cfg.target, ctx.device)
        grids = m2ib_grids(model, images, tf, image_seeds([s.name for s in scans], ctx.seed), cfg, betas)
    return grids_to_frames(grids, [s.image.shape[:2] for s in scans], input_size(model.visual), ctx.align)
