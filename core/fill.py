"""The one classical fill: harmonic (Laplace) interpolation of a masked region from its surroundings.

Used as the chosen image for real scans without a healthy twin (generator data), by the contrast judge and as
the no-generator baseline of the study. Formula: docs/method.md#judges.
"""

from __future__ import annotations

import numpy as np

INITS = ("source", "harmonic")  # what a generator's sampling may start from: the positive | its harmonic fill


def harmonic_fill(image: np.ndarray, mask: np.ndarray, _solver: dict | None = None) -> np.ndarray:
    """``image`` with the masked pixels replaced by the harmonic (Laplace) interpolation of their
    surroundings: the smoothest fill consistent with the unmasked border (4-neighbour, Neumann at
    the image edge). The sparse factorisation is cached in ``_solver`` for reuse with the same mask.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    out = image.astype(np.float64).copy()
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return out
    h, w = mask.shape
    if _solver is None or "lu" not in _solver:
        index = -np.ones(mask.shape, np.int64)
        index[ys, xs] = np.arange(len(ys))
        rows, cols, vals, diag = [], [], [], np.zeros(len(ys))
        border: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = ys + dy, xs + dx
            valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            diag += valid
            i = np.nonzero(valid)[0]
            j = index[ny[i], nx[i]]
            inner = j >= 0
            rows += [i[inner]]
            cols += [j[inner]]
            vals += [-np.ones(inner.sum())]
            border.append((i[~inner], ny[i[~inner]], nx[i[~inner]]))
        n = len(ys)
        a = coo_matrix((np.concatenate(vals + [diag]), (np.concatenate(rows + [np.arange(n)]),
                                                         np.concatenate(cols + [np.arange(n)]))), shape=(n, n))
        solver = {"lu": splu(a.tocsc()), "border": border}
        if _solver is not None:
            _solver.update(solver)
    else:
        solver = _solver
    rhs = np.zeros(len(ys))
    for i, by, bx in solver["border"]:
        np.add.at(rhs, i, out[by, bx])
    out[ys, xs] = solver["lu"].solve(rhs)
    return out


def classical_fill(image: np.ndarray, mask: np.ndarray, dilate: int = 2) -> np.ndarray:
    """Harmonic fill inside ``mask`` dilated by ``dilate`` px; gray (H, W) or colour (H, W, C), float [0, 1]."""
    from scipy import ndimage

    m = ndimage.binary_dilation(mask, iterations=dilate) if dilate else np.asarray(mask, bool)
    img = np.asarray(image, np.float64)
    if img.ndim == 2:
        return harmonic_fill(img, m).astype(np.float32)
    solver: dict = {}
    return np.stack([harmonic_fill(img[..., c], m, solver) for c in range(img.shape[-1])], -1).astype(np.float32)
