"""Saliency map -> coarse binary mask -> SAM prompts (boxes, points).

* ``kmeans_mask``: sklearn 2-means on the 8-bit map values (fitted on the distinct levels weighted by
  their pixel counts: the same objective, cost independent of the resolution), foreground = the
  cluster with the larger centroid. ``parity=True`` reproduces the public steps: quantise to 8 bit (as the PNG it reads),
  resize to 256 x 256 (nearest), ``KMeans(2, random_state=10, n_init=10)``, labels back (nearest).
* ``threshold_mask``: ``map > t`` (strict, default 0.3); ``otsu_mask``: Otsu's threshold on the 8-bit map.
* ``keep_largest``: the K largest 8-connected components. Ties: ``ties="exact"`` (default) keeps
  exactly K, ordering by area (desc.) then by label (raster order of the component's first pixel);
  ``ties="parity"`` keeps every component whose area equals one of the K largest areas, as the
  public code does (so two equal blobs both survive K=1).
* ``boxes_from_mask``: OpenCV external contours; ``"union"`` = one box around all of them, ``"per_component"``
  = one per contour; XYXY with exclusive right/bottom (``x + w``), x1/y1 clipped to W-1/H-1 as in
  the public code. An empty mask gives no box.
* ``foreground_mask`` (optional, ``region`` of ``coarse_mask``): the scan's anatomy -- half Otsu's threshold of
  the Gaussian-smoothed image (Otsu's own splits bright tissue from dark tissue and cut lesions at the
  anatomy's edge: on the medium phantoms it kept as little as 22% of an ultrasound mass, half of it 67%),
  the largest 8-connected component, its convex hull filled (the brain outline and
  the ultrasound fan are convex; the hull also takes in dark lesions and hypoechoic masses at the border,
  which a plain hole fill would miss). With a region, k-means is fitted on the map's values inside it only
  and the coarse mask is restricted to it, so bright skull/background edges cannot win the cluster.
* ``sample_points``: ``n`` positive pixels without replacement (all of them if fewer), optional
  negatives from the background, from a seeded ``numpy.random.Generator`` (the public code is unseeded).

Formulas and sources: docs/method.md#post-processing.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

PostMethod = Literal["kmeans", "threshold", "otsu"]


def _u8(saliency: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(saliency, np.float64) * 255.0), 0, 255).astype(np.uint8)


def foreground_mask(image: np.ndarray, sigma: float = 2.0, otsu_fraction: float = 0.5) -> np.ndarray:
    """The scan's anatomy (bool, H x W): smoothed 8-bit image > ``otsu_fraction`` x Otsu's threshold -> largest
    component -> filled convex hull. A constant image gives an all-True mask (nothing to separate)."""
    img = np.asarray(image, np.float64)
    if img.ndim == 3:
        img = img.mean(-1)
    if img.max() > 1.0:
        img = img / 255.0
    u8 = _u8(cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img)
    if u8.min() == u8.max():
        return np.ones(u8.shape, bool)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    largest = keep_largest(u8 > t * otsu_fraction, 1)
    hull = cv2.convexHull(np.stack(np.nonzero(largest)[::-1], axis=1).astype(np.int32))
    out = np.zeros(u8.shape, np.uint8)
    cv2.fillPoly(out, [hull.reshape(-1, 2)], 1)
    return out.astype(bool) | largest


def kmeans_mask(saliency: np.ndarray, parity: bool = False, random_state: int = 10,
                region: np.ndarray | None = None) -> np.ndarray:
    """Two-cluster k-means foreground of a [0, 1] map (constant map -> empty mask).

    ``region`` (bool, same shape): fit on the map's values inside it only; the result lies inside it."""
    from sklearn.cluster import KMeans

    sal = np.asarray(saliency, np.float64)
    h, w = sal.shape
    if region is not None:
        region = np.asarray(region, bool)
        if parity:
            raise ValueError("kmeans parity reproduces the public code, which has no region: use one or the other")
        if not region.any():
            return np.zeros((h, w), bool)
        levels, counts = np.unique(_u8(sal[region]), return_counts=True)
        if len(levels) < 2:
            return np.zeros((h, w), bool)
        km = KMeans(n_clusters=2, random_state=random_state, n_init=10)
        km.fit(levels.reshape(-1, 1) / 255.0, sample_weight=counts)
        fg_levels = levels[km.labels_ == int(np.argmax(km.cluster_centers_[:, 0]))]
        return np.isin(_u8(sal), fg_levels) & region
    if parity:
        sal = cv2.resize(_u8(sal), (256, 256), interpolation=cv2.INTER_NEAREST).astype(np.float64) / 255.0
    if np.ptp(sal) == 0:
        return np.zeros((h, w), bool)
    if parity:  # the public call: every pixel a sample
        km = KMeans(n_clusters=2, random_state=random_state, n_init=10).fit(sal.reshape(-1, 1))
        fg = km.labels_.reshape(sal.shape) == int(np.argmax(km.cluster_centers_[:, 0]))
    else:  # same objective on the 8-bit histogram (distinct levels weighted by count): resolution-free cost
        levels, counts = np.unique(_u8(sal), return_counts=True)
        if len(levels) < 2:
            return np.zeros((h, w), bool)
        km = KMeans(n_clusters=2, random_state=random_state, n_init=10)
        km.fit(levels.reshape(-1, 1) / 255.0, sample_weight=counts)
        fg_levels = levels[km.labels_ == int(np.argmax(km.cluster_centers_[:, 0]))]
        fg = np.isin(_u8(sal), fg_levels)
    if parity:
        fg = cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return fg


def threshold_mask(saliency: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    return np.asarray(saliency) > threshold


def otsu_mask(saliency: np.ndarray) -> np.ndarray:
    """Otsu's threshold on the 8-bit map (foreground = above); constant map -> empty mask."""
    u8 = _u8(saliency)
    if u8.min() == u8.max():
        return np.zeros(u8.shape, bool)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return u8 > t


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label image, areas of labels 1..n), 8-connected."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    return labels, stats[1:, cv2.CC_STAT_AREA]


def keep_largest(mask: np.ndarray, k: int = 1, ties: Literal["exact", "parity"] = "exact") -> np.ndarray:
    """The ``k`` largest 8-connected components (``k <= 0`` keeps everything); see module doc for ties."""
    mask = np.asarray(mask, bool)
    if k <= 0 or not mask.any():
        return mask.copy()
    labels, areas = components(mask)
    if ties == "parity":
        top = set(sorted(areas.tolist(), reverse=True)[:k])
        keep = [i + 1 for i, a in enumerate(areas) if a in top]
    elif ties == "exact":
        order = sorted(range(len(areas)), key=lambda i: (-int(areas[i]), i))
        keep = [i + 1 for i in order[:k]]
    else:
        raise ValueError(f"unknown ties rule '{ties}' (use 'exact' or 'parity')")
    return np.isin(labels, keep)


def contours(mask: np.ndarray) -> list[np.ndarray]:
    found, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(found)


def num_contours(mask: np.ndarray) -> int:
    return len(contours(mask))


def boxes_from_mask(mask: np.ndarray, mode: Literal["union", "per_component"] = "union") -> np.ndarray:
    """(N, 4) XYXY boxes (float32); N = 0 for an empty mask."""
    h, w = np.asarray(mask).shape
    found = contours(mask)
    if not found:
        return np.zeros((0, 4), np.float32)
    if mode == "union":
        rects = [cv2.boundingRect(np.concatenate(found))]
    elif mode == "per_component":
        rects = [cv2.boundingRect(c) for c in found]
        rects.sort(key=lambda r: (r[1], r[0]))  # top-to-bottom, left-to-right (OpenCV order is not stable)
    else:
        raise ValueError(f"unknown box mode '{mode}' (use 'union' or 'per_component')")
    boxes = [[x, y, min(x + bw, w - 1), min(y + bh, h - 1)] for x, y, bw, bh in rects]
    return np.asarray(boxes, np.float32)


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator,
                  n_negative: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) (x, y) points and (N,) labels (1 = inside the mask, 0 = outside), drawn without replacement."""
    mask = np.asarray(mask, bool)
    out_pts, out_lbl = [], []
    for region, count, label in ((mask, n, 1), (~mask, n_negative, 0)):
        ys, xs = np.nonzero(region)
        if count <= 0 or len(xs) == 0:
            continue
        idx = rng.choice(len(xs), size=min(count, len(xs)), replace=False)
        out_pts.append(np.stack([xs[idx], ys[idx]], axis=1))
        out_lbl.append(np.full(len(idx), label))
    if not out_pts:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    return np.concatenate(out_pts).astype(np.float32), np.concatenate(out_lbl).astype(np.int64)


def coarse_mask(saliency: np.ndarray, method: PostMethod = "kmeans", threshold: float = 0.3, k: int = 1,
                ties: Literal["exact", "parity"] = "exact", parity: bool = False,
                region: np.ndarray | None = None) -> np.ndarray:
    """Saliency -> binary mask (method) -> K-largest-component filter; ``region`` (e.g. ``foreground_mask``)
    restricts the mask (and the k-means fit) to it."""
    if method == "kmeans":
        fg = kmeans_mask(saliency, parity=parity, region=region)
    elif method == "threshold":
        fg = threshold_mask(saliency, threshold)
    elif method == "otsu":
        fg = otsu_mask(saliency) if region is None else otsu_mask(np.where(region, saliency, 0.0))
    else:
        raise ValueError(f"unknown post-processing '{method}' (use kmeans, threshold or otsu)")
    if region is not None:
        fg = fg & np.asarray(region, bool)
    return keep_largest(fg, k, ties)
