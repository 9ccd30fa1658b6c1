"""Continuous saliency metrics: how well a raw saliency map finds the lesion, with no k-means or SAM in between.

Per image, from the raw map ``sal`` (before post-processing), the lesion mask and a region of pixels to score
(``None`` = the whole frame; ``negdpo evaluate`` scores the anatomy ∪ the lesion, see :func:`score_region`):

* :func:`lesion_auroc` -- P(a lesion pixel's value > a background pixel's), ties counted 1/2 (Mann-Whitney);
* :func:`lesion_ap` -- average precision of the pixels ranked by the map (scikit-learn's step definition);
* :func:`pointing_game` -- the map's maximum lies within ``tolerance`` px of the lesion (share of tied maxima);
* :func:`partial_r` -- Pearson correlation of map and mask after both are residualised on the local
  brightness (the image under a Gaussian of ``sigma`` x min(H, W), :func:`local_brightness`) by least
  squares: what the map knows about the lesion beyond how bright the pixel's neighbourhood is.

All are NaN when the region holds no lesion pixel (or no background pixel). A map that carries nothing
beyond brightness (a constant map included) has partial r 0; when the mask itself is a linear function of
brightness the partial correlation is undefined (NaN).

Formulas and sources: docs/method.md#saliency-metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BRIGHTNESS_SIGMA = 0.03  # x min(H, W): FWHM 2.355 sigma ~ 7 % of the side, one patch of a 14 x 14 ViT grid
EXPLAINED = 1e-10  # residual / total sum of squares below this: fully explained by brightness
COLUMNS = ("sal_auroc", "sal_ap", "sal_pointing", "sal_partial_r")


def _check(sal: np.ndarray, mask: np.ndarray, region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, m = np.asarray(sal, np.float64), np.asarray(mask) != 0
    if s.ndim != 2 or s.shape != m.shape:
        raise ValueError(f"saliency map {s.shape} and lesion mask {m.shape} must be 2-D of the same shape")
    r = np.ones(m.shape, bool) if region is None else np.asarray(region) != 0
    if r.shape != m.shape:
        raise ValueError(f"region {r.shape} and lesion mask {m.shape} differ in shape")
    return s, m, r


def _scores(sal: np.ndarray, mask: np.ndarray, region: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(map values, lesion labels) over the region; None when it lacks lesion or background pixels."""
    s, m, r = _check(sal, mask, region)
    y = m[r]
    if not y.any() or y.all():
        return None
    return s[r], y


def lesion_auroc(sal: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None) -> float:
    """Area under the ROC curve of the map separating lesion from other pixels (ties 1/2); 0.5 = chance."""
    from scipy.stats import rankdata

    flat = _scores(sal, mask, region)
    if flat is None:
        return math.nan
    s, y = flat
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    ranks = rankdata(s)  # average ranks: a tie between a lesion and a background pixel counts 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def lesion_ap(sal: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None) -> float:
    """Average precision: sum over distinct thresholds (descending) of (recall step) x precision; equals
    ``sklearn.metrics.average_precision_score``. Chance = the lesion's share of the region."""
    flat = _scores(sal, mask, region)
    if flat is None:
        return math.nan
    s, y = flat
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[s[1:] != s[:-1], True]  # the last pixel of each run of equal values: one threshold per run
    tp_at, seen_at = tp[last], np.flatnonzero(last) + 1
    recall_steps = np.diff(np.r_[0, tp_at]) / tp[-1]
    return float(np.sum(recall_steps * tp_at / seen_at))


def pointing_game(sal: np.ndarray, mask: np.ndarray, tolerance: float = 0.0,
                  region: np.ndarray | None = None) -> float:
    """1 if the map's maximum over the region lies within ``tolerance`` px (Euclidean) of a lesion pixel,
    else 0; with several maximal pixels, the share of them that do. NaN without a lesion in the region."""
    from scipy.ndimage import distance_transform_edt

    if _scores(sal, mask, region) is None:
        return math.nan
    s, m, r = _check(sal, mask, region)
    peak = s[r].max()
    at_peak = r & (s == peak)
    near = distance_transform_edt(~m) <= tolerance  # distance 0 inside the lesion
    return float(near[at_peak].mean())


def local_brightness(image: np.ndarray, sigma: float = BRIGHTNESS_SIGMA) -> np.ndarray:
    """The image (RGB averaged to gray) under a Gaussian of ``sigma`` x min(H, W) px (edges: nearest)."""
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, np.float64)
    if img.ndim == 3:
        img = img.mean(-1)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (or H x W x C), got shape {np.asarray(image).shape}")
    return gaussian_filter(img, sigma * min(img.shape), mode="nearest") if sigma > 0 else img


def _residual(v: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, bool]:
    """Least-squares residual of ``v`` on the design's columns, and whether they explain ``v`` entirely."""
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    res = v - design @ coef
    centred = v - v.mean()
    return res, bool(v.min() == v.max()) or float(res @ res) <= EXPLAINED * float(centred @ centred)


def partial_corr(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Pearson correlation of ``x`` and ``y`` given ``z`` (1-D, same length): of their residuals after a
    least-squares fit of ``a + b z``. 0 if ``z`` explains ``x`` entirely, NaN if it explains ``y`` entirely."""
    x, y, z = (np.asarray(v, np.float64).ravel() for v in (x, y, z))
    if not x.size == y.size == z.size:
        raise ValueError(f"partial correlation needs equal lengths, got {x.size}, {y.size}, {z.size}")
    design = np.stack([np.ones_like(z), z], axis=1)
    ry, y_explained = _residual(y, design)
    if y_explained:
        return math.nan
    rx, x_explained = _residual(x, design)
    if x_explained:
        return 0.0
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float(np.clip(rx @ ry / math.sqrt(float(rx @ rx) * float(ry @ ry)), -1.0, 1.0))


def partial_r(sal: np.ndarray, mask: np.ndarray, brightness: np.ndarray, region: np.ndarray | None = None) -> float:
    """:func:`partial_corr` of map and lesion mask given ``brightness`` (:func:`local_brightness`) over the region."""
    if _scores(sal, mask, region) is None:
        return math.nan
    s, m, r = _check(sal, mask, region)
    b = np.asarray(brightness, np.float64)
    if b.shape != m.shape:
        raise ValueError(f"brightness {b.shape} and lesion mask {m.shape} differ in shape")
    return partial_corr(s[r], m[r].astype(np.float64), b[r])


@dataclass(frozen=True)
class LesionReference:
    """What every map of one scan is scored against, computed once per scan (all checkpoints and prompts)."""

    mask: np.ndarray
    region: np.ndarray
    brightness: np.ndarray


def score_region(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The anatomy (``postprocess.foreground_mask``) ∪ the lesion: the dark frame outside the anatomy is trivially
    lesion-free and dark, so scoring it would reward any brightness map; the union keeps every lesion pixel."""
    from .postprocess import foreground_mask

    return foreground_mask(image) | (np.asarray(mask) != 0)


def reference(image: np.ndarray, mask: np.ndarray, sigma: float = BRIGHTNESS_SIGMA,
              region: np.ndarray | None = None) -> LesionReference:
    """The scan's lesion mask, scoring region (default :func:`score_region`) and local brightness."""
    m = np.asarray(mask) != 0
    return LesionReference(mask=m, region=score_region(image, m) if region is None else np.asarray(region) != 0,
                           brightness=local_brightness(image, sigma))


def saliency_metrics(sal: np.ndarray, ref: LesionReference, tolerance: float) -> dict[str, float]:
    """The four metrics of one map as the ``metrics.csv`` columns (:data:`COLUMNS`)."""
    return {"sal_auroc": lesion_auroc(sal, ref.mask, ref.region), "sal_ap": lesion_ap(sal, ref.mask, ref.region),
            "sal_pointing": pointing_game(sal, ref.mask, tolerance, ref.region),
            "sal_partial_r": partial_r(sal, ref.mask, ref.brightness, ref.region)}
