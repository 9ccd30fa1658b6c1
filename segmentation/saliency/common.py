"""Shared pieces of the CLIP saliency methods: preprocessing geometry, ViT tower split, map read-out.

Read-out of a patch-grid score (both M2IB and CLIP Surgery):
  grid (14 x 14) -> bilinear upsample to the crop size (224, ``align_corners=False``) -> min-max to
  [0, 1] (a constant map becomes all zeros, the public code gives NaN) -> back to the scan's frame:
  ``align="crop"`` pastes the crop into the shortest-edge-resized frame (outside = 0) and resizes that
  to (W, H) bilinearly; ``align="stretch"`` (parity) resizes the crop map itself to (W, H) with
  OpenCV nearest neighbour, as the public implementation does.

Formulas and sources: docs/method.md#m2ib.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.imageio import to_rgb_uint8
from PIL import Image


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's input crop lies in the resized frame (torchvision Resize + CenterCrop)."""

    resized_h: int
    resized_w: int
    top: int
    left: int
    crop: int


def crop_geometry(h: int, w: int, crop: int = 224) -> CropGeometry:
    """Shortest edge -> ``crop`` (long edge ``int(crop*long/short)``), then a centred crop x crop window."""
    if h <= w:
        rh, rw = crop, int(crop * w / h)
    else:
        rh, rw = int(crop * h / w), crop
    return CropGeometry(rh, rw, int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0)), crop)


def preprocess_batch(images: Sequence[np.ndarray], preprocess, device: str | torch.device) -> torch.Tensor:
    """[0,1] grayscale/RGB arrays -> the CLIP model's normalised input batch (B, 3, S, S)."""
    tensors = [preprocess(Image.fromarray(to_rgb_uint8(im))) for im in images]
    return torch.stack(tensors).to(device)


def upsample_grid(grid: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, size, size), bilinear, ``align_corners=False``."""
    return F.interpolate(grid[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    out = (maps - lo[:, None, None]) / span[:, None, None]
    return torch.where((hi > lo)[:, None, None], out, torch.zeros_like(out))


def to_frame(crop_map: np.ndarray, h: int, w: int, align: Literal["crop", "stretch"] = "crop") -> np.ndarray:
    """A [0,1] map over the model's input crop -> a float32 map over the (H, W) scan frame."""
    crop_map = np.asarray(crop_map, dtype=np.float32)
    if align == "stretch":
        return cv2.resize(crop_map, (w, h), interpolation=cv2.INTER_NEAREST)
    if align != "crop":
        raise ValueError(f"unknown align '{align}' (use 'crop' or 'stretch')")
    g = crop_geometry(h, w, crop_map.shape[0])
    canvas = np.zeros((g.resized_h, g.resized_w), np.float32)
    canvas[g.top:g.top + g.crop, g.left:g.left + g.crop] = crop_map
    return np.clip(cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def grids_to_frames(grids: torch.Tensor, shapes: Sequence[tuple[int, int]], crop: int,
                    align: Literal["crop", "stretch"]) -> list[np.ndarray]:
    """(B, h, w) scores -> per-scan [0,1] maps at each scan's (H, W)."""
    maps = minmax(upsample_grid(grids.detach().float(), crop)).cpu().numpy()
    return [to_frame(m, h, w, align) for m, (h, w) in zip(maps, shapes, strict=True)]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a saliency method with dropout / drop-path off; the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -- the open_clip / timm vision tower, split at a block ------------------------------------------
def _trunk(visual):
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
        raise TypeError("saliency needs an open_clip TimmModel vision tower wrapping a timm ViT "
                        "(e.g. BiomedCLIP or the tiny preset); got " + type(visual).__name__)
    return trunk


def num_blocks(visual) -> int:
    return len(_trunk(visual).blocks)


def patch_grid(visual, image_hw: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(grid rows, grid cols, number of prefix tokens such as CLS) for input size ``image_hw``."""
    trunk = _trunk(visual)
    ph, pw = trunk.patch_embed.patch_size
    h, w = image_hw or (input_size(visual),) * 2
    return h // ph, w // pw, int(getattr(trunk, "num_prefix_tokens", 1))


def input_size(visual) -> int:
    """The square input size the tower is used at (open_clip's ``image_size``; timm may differ)."""
    size = getattr(visual, "image_size", None) or _trunk(visual).patch_embed.img_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def tokens_through(visual, images: torch.Tensor, last_block: int) -> torch.Tensor:
    """Residual stream (B, T, D) after block ``last_block`` (0-based; -1 = the embeddings)."""
    trunk = _trunk(visual)
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
    for blk in trunk.blocks[:last_block + 1]:
        x = blk(x)
    return x


def embed_from(visual, tokens: torch.Tensor, first_block: int) -> torch.Tensor:
    """Blocks ``first_block..`` then final norm, token pooling and projection -> (B, embed_dim)."""
    trunk = _trunk(visual)
    x = tokens
    for blk in trunk.blocks[first_block:]:
        x = blk(x)
    return visual.head(trunk.forward_head(trunk.norm(x)))


def text_features(model, tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    """Unnormalised text embeddings (N, E), each distinct prompt encoded once."""
    unique = list(dict.fromkeys(prompts))
    with torch.no_grad():
        feats = model.encode_text(tokenizer(unique).to(device))
    index = {p: i for i, p in enumerate(unique)}
    return feats[[index[p] for p in prompts]]
