"""Segmentation metrics on 2-D boolean masks: Dice, IoU, NSD (true 2-D boundary or parity slab), HD95.

Conventions (both masks are 2-D, same shape, any non-zero = foreground):

================  ==========  ==========  ================================================
case              Dice / IoU  NSD         HD95
================  ==========  ==========  ================================================
both empty        1.0         1.0         0.0   (a correct "nothing here" prediction)
one empty         0.0         0.0         nan   (undefined; reported as a count, not averaged)
================  ==========  ==========  ================================================

The public implementation aborts on both-empty images and scores one-empty as 0/0; the one-empty
rule is the same here. Pass ``empty=nan`` to :func:`dice`/:func:`iou`/:func:`nsd` to get NaN for
both-empty instead (so a caller can skip those images).

NSD uses MONAI's ``compute_surface_dice`` with sub-voxel surface elements (the DeepMind
surface-distance algorithm):

* ``mode="boundary"`` (default): the masks as 2-D images -> contour segments weighted by length; a
  true boundary NSD (shifted 20x20 square by 3 px at tolerance 2: 0.5507).
* ``mode="parity"``: the masks reshaped to H x W x 1 volumes as the public ``SurfaceDice.py`` does;
  the top and bottom faces of the 1-voxel slab count as surface, so the value is close to a
  tolerant Dice (same case: 0.9666). Use it only to compare with published numbers.

HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)`` (boundary pixels, Euclidean, max of the
two directed 95th percentiles), in pixels.

Formulas and sources: docs/method.md#metrics.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np

NSDMode = Literal["boundary", "parity"]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.ndim != 2 or g.ndim != 2:
        raise ValueError(f"masks must be 2-D, got pred {p.shape} and gt {g.shape}")
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: pred {p.shape} vs gt {g.shape}")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray, empty: float = 1.0) -> float:
    """2|P∩G| / (|P|+|G|); ``empty`` when both masks are empty."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return float(empty) if total == 0 else 2.0 * int((p & g).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray, empty: float = 1.0) -> float:
    """|P∩G| / |P∪G|; ``empty`` when both masks are empty."""
    p, g = _pair(pred, gt)
    union = int((p | g).sum())
    return float(empty) if union == 0 else int((p & g).sum()) / union


def _monai(fn, *args, **kwargs):
    with warnings.catch_warnings():  # MONAI emits internal deprecation warnings on every call
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, mode: NSDMode = "boundary",
        empty: float = 1.0) -> float:
    """Normalised surface Dice at ``tolerance`` pixels (``<=``); see the module doc for the modes."""
    import torch
    from monai.metrics import compute_surface_dice

    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return float(empty)
    if not p.any() or not g.any():
        return 0.0
    if mode == "boundary":
        pt, gtt = torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None]
    elif mode == "parity":
        pt, gtt = torch.from_numpy(p)[None, None, ..., None], torch.from_numpy(g)[None, None, ..., None]
    else:
        raise ValueError(f"unknown NSD mode '{mode}' (use 'boundary' or 'parity')")
    val = _monai(compute_surface_dice, pt.float(), gtt.float(), [float(tolerance)], include_background=True,
                 use_subvoxels=True)
    return float(val.item())


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels; 0 if both empty, nan if one is."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    p, g = _pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return math.nan
    val = _monai(compute_hausdorff_distance, torch.from_numpy(p)[None, None].float(),
                 torch.from_numpy(g)[None, None].float(), include_background=True, percentile=95)
    return float(val.item())


def parity_round(value: float) -> float:
    """The public evaluation rounds every per-image DSC/NSD to 4 decimals before averaging."""
    return value if math.isnan(value) else round(value, 4)


def all_metrics(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0) -> dict[str, float]:
    """Every metric of one image as a flat dict (the per-image columns of ``metrics.csv``)."""
    return {"dice": dice(pred, gt), "iou": iou(pred, gt), "nsd": nsd(pred, gt, tolerance),
            "nsd_parity": nsd(pred, gt, tolerance, mode="parity"), "hd95": hd95(pred, gt)}
