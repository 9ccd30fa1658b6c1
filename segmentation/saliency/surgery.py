"""CLIP Surgery saliency (Li et al. 2023; docs/method.md#clip-surgery): training-free, two ideas.

1. Architecture surgery, a second "v-v" path: from block ``start`` on, every block's attention
   input (norm1 of the original stream) is also run through a self-attention whose query and key
   are the value projections (softmax(v v^T * scale) v, then the block's output projection); those
   outputs are accumulated on a side stream that skips the MLPs. The original stream is untouched,
   and its CLS token replaces the side stream's CLS. Both go through the final norm and projection.
2. Feature surgery against a class list (the target prompt + background classes): per class, the
   token x text elementwise products are weighted by w = p / mean(p), p = softmax(2 * cos(CLS, class)),
   the mean over classes (the class-common part) is subtracted, and the channels are summed.
The target prompt's similarity over the patch tokens is the map (read-out as in ``common``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import SaliencyContext, register
from .common import (
    _trunk,
    eval_mode,
    grids_to_frames,
    input_size,
    patch_grid,
    preprocess_batch,
    text_features,
)

BACKGROUND_CLASSES = ("background", "normal tissue", "healthy tissue", "bone", "skull", "skin", "fat",
                      "muscle", "air", "blood vessel", "fluid", "noise")
TEMPLATES = ("a medical image of {}.", "a scan showing {}.", "{}.")


def _vv_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Value-value self-attention of a timm ``Attention`` on its (already normalised) input."""
    b, n, c = x.shape
    heads = attn.num_heads
    v = attn.qkv(x).reshape(b, n, 3, heads, c // heads)[:, :, 2].transpose(1, 2)  # (B, h, N, d)
    weights = (v @ v.transpose(-2, -1) * attn.scale).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


@torch.no_grad()
def surgery_tokens(visual, images: torch.Tensor, start: int | None = None) -> torch.Tensor:
    """Projected per-token features (B, T, E) of the v-v path, CLS from the original path (eval mode)."""
    with eval_mode(visual):
        return _surgery_tokens(visual, images, start)


def _surgery_tokens(visual, images: torch.Tensor, start: int | None) -> torch.Tensor:
    trunk = _trunk(visual)
    n = len(trunk.blocks)
    start = max(n // 2, 0) if start is None else start
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
    side = None
    for i, blk in enumerate(trunk.blocks):
        if i == start:
            side = x.clone()
        if side is not None:
            side = side + _vv_attention(blk.attn, blk.norm1(x))
        x = blk(x)
    side = x.clone() if side is None else side
    side[:, 0] = x[:, 0]
    return visual.head(trunk.norm(side))


def feature_surgery(tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(B, T, E) unit image tokens x (N, E) unit class embeddings -> (B, T, N) similarities."""
    p = (2.0 * tokens[:, :1] @ texts.T).softmax(dim=-1)  # (B, 1, N) from the CLS token
    w = p / p.mean(dim=-1, keepdim=True)
    feats = tokens[:, :, None, :] * texts[None, None] * w[:, :, :, None]  # (B, T, N, E)
    return (feats - feats.mean(dim=2, keepdim=True)).sum(-1)


def class_embeddings(model, tokenizer, classes: Sequence[str], device) -> torch.Tensor:
    """Template-ensembled unit embeddings (N, E) for background class names."""
    prompts = [t.format(c) for c in classes for t in TEMPLATES]
    feats = F.normalize(text_features(model, tokenizer, prompts, device).float(), dim=-1)
    return F.normalize(feats.reshape(len(classes), len(TEMPLATES), -1).mean(1), dim=-1)


@register("surgery")
def surgery(ctx: SaliencyContext, scans: Sequence, prompts: Sequence[str]) -> list[np.ndarray]:
    """Options: ``surgery_start`` (first v-v block, default n_blocks // 2), ``classes`` (background list)."""
    if ctx.clip is None:
        raise ValueError("surgery needs a CLIP model")
    model, preprocess, tokenizer = ctx.clip
    visual = model.visual
    images = preprocess_batch([s.image for s in scans], preprocess, ctx.device)
    gh, gw, prefix = patch_grid(visual, tuple(images.shape[-2:]))
    with eval_mode(model):  # dropout off in both towers; the caller's mode is restored
        tokens = F.normalize(surgery_tokens(visual, images, ctx.options.get("surgery_start")).float(), dim=-1)
        background = class_embeddings(model, tokenizer, ctx.options.get("classes") or BACKGROUND_CLASSES,
                                       ctx.device)
        targets = F.normalize(text_features(model, tokenizer, prompts, ctx.device).float(), dim=-1)
    grids = []
    for i in range(len(scans)):  # each image has its own target prompt -> its own class list
        classes = torch.cat([targets[i:i + 1], background])
        sim = feature_surgery(tokens[i:i + 1], classes)[0, prefix:, 0]
        grids.append(sim.reshape(gh, gw))
    return grids_to_frames(torch.stack(grids), [s.image.shape[:2] for s in scans], input_size(visual), ctx.align)
