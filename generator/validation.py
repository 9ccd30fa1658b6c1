"""Validation grids during generator training: source | mask | policy | reference | healthy target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Pair
from .pipeline import Components, UNetReference


def validation_grid(comp: Components, unet: torch.nn.Module, reference: UNetReference | None, pairs: list[Pair],
                    cfg: Any, path: Path) -> np.ndarray:
    """Rows: source | mask | policy output | reference output | chosen (target fill). Saved as PNG."""
    from negdpo.core.figures import write_grid
    from negdpo.core.imageio import to_gray

    from .sample import inpaint

    pipe = comp.pipe
    was_training = unet.training
    unet.eval()
    images = [p.source for p in pairs]
    masks = [p.mask for p in pairs]
    prompts = [p.prompt for p in pairs]
    seeds = [cfg.seed + i for i in range(len(pairs))]
    kw = dict(steps=cfg.validation_inference_steps, paste_back=False, size=images[0].shape[0], scheduler="ddim")
    original_unet = pipe.unet
    pipe.unet = unet
    try:
        policy = inpaint(pipe, images, masks, prompts, seeds, **kw)
        if reference is not None:
            with reference.active() as ref_unet:
                pipe.unet = ref_unet
                ref = inpaint(pipe, images, masks, prompts, seeds, **kw)
        else:
            ref = [np.zeros_like(x) for x in policy]
    finally:
        pipe.unet = original_unet
        unet.train(was_training)
    rows = [[to_gray(p.source), p.mask.astype(np.float32), to_gray(po), to_gray(r), to_gray(p.chosen)]
            for p, po, r in zip(pairs, policy, ref)]
    write_grid(path, rows, column_labels=["source", "mask", "policy", "reference", "chosen (target)"])
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))
