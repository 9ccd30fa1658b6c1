"""``oracle`` saliency: the ground-truth mask blurred (Gaussian), min-max to [0, 1].

Not a method -- a control that isolates the post-processing and SAM stages (a good saliency map
should give a high Dice after k-means; a scan without lesion gives an all-zero map).
Option ``oracle_sigma``: blur sigma as a fraction of min(H, W) (default 0.02).

Formulas and sources: docs/method.md#clip-surgery.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from .base import SaliencyContext, register


def blurred_mask(mask: np.ndarray, sigma_frac: float = 0.02) -> np.ndarray:
    m = np.asarray(mask, dtype=np.float32)
    if not m.any():
        return np.zeros_like(m)
    out = gaussian_filter(m, sigma=max(sigma_frac * min(m.shape), 1e-6))
    lo, hi = float(out.min()), float(out.max())
    return ((out - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(m)


@register("oracle")
def oracle(ctx: SaliencyContext, scans: Sequence, prompts: Sequence[str]) -> list[np.ndarray]:
    sigma = float(ctx.options.get("oracle_sigma") or 0.02)
    return [blurred_mask(s.mask, sigma) for s in scans]
