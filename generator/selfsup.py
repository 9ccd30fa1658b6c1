"""Self-supervised inpainting pairs from healthy tissue: no healthy twin needed (docs/method.md#self-supervised-sft).

The model learns to repaint masked regions whose true content is known: healthy scans of the split (empty
masks), ``negatives/`` (training split only) and the tumour-free parts of positives. Each repaint mask is a
*training* lesion mask (so the masks have the shape and size distribution of real lesions), rotated by a
random angle, randomly flipped and moved to a random place; a placement is rejected when it overlaps the
lesion dilated by ``margin`` px or leaves the scan's foreground. The target is the original pixels
(``chosen = rejected = source``). Every draw comes from ``derive_seed("selfsup", name, j, base=seed)``, so the
pairs are a function of (folder, seed) and training on them resumes exactly like any other pair set.

The scan folder is read with ``read_twins=False``: nothing under ``<split>_twins/`` is opened.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from .data import Pair, PairDataError, _mask, _rgb

logger = logging.getLogger(__name__)
FOREGROUND = 0.05  # a pixel with gray value above this is anatomy, not background
MIN_FOREGROUND = 0.9  # share of a placed mask that must lie on anatomy


def lesion_mask_bank(root: str | Path, split: str = "train") -> list[np.ndarray]:
    """The non-empty lesion masks of ``split`` (cropped to their bounding box); reads masks only."""
    from negdpo.core.imageio import read_mask
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(root, on_error="skip", read_twins=False)
    bank = []
    for _, mask_path in folder.pairs(split):
        if mask_path is None:
            continue
        m = np.asarray(read_mask(mask_path), bool)
        if m.any():
            bank.append(crop_to_mask(m))
    return bank


def crop_to_mask(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def random_pose(shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``shape`` (a cropped bool mask) rotated by a uniform angle (bilinear, cut at 1/2) and flipped with p = 1/2."""
    rot = ndimage.rotate(shape.astype(np.float32), float(rng.uniform(0.0, 360.0)), order=1, reshape=True) > 0.5
    if rng.random() < 0.5:
        rot = rot[:, ::-1]
    return crop_to_mask(rot) if rot.any() else shape


def place_mask(shape: np.ndarray, image: np.ndarray, forbidden: np.ndarray | None, rng: np.random.Generator,
               tries: int = 50) -> np.ndarray | None:
    """``shape`` at a random place of ``image`` (H, W[, 3]) that avoids ``forbidden`` and lies on anatomy.

    Accepted when no mask pixel is forbidden and >= ``MIN_FOREGROUND`` of them have gray value > ``FOREGROUND``;
    None after ``tries`` rejected draws (or when the shape does not fit).
    """
    h, w = image.shape[:2]
    sh, sw = shape.shape
    if sh > h or sw > w:
        return None
    gray = image.mean(axis=-1) if image.ndim == 3 else image
    fg = gray > FOREGROUND
    ys, xs = np.nonzero(shape)
    for _ in range(tries):
        y0, x0 = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        yy, xx = ys + y0, xs + x0
        if forbidden is not None and forbidden[yy, xx].any():
            continue
        if fg[yy, xx].mean() < MIN_FOREGROUND:
            continue
        out = np.zeros((h, w), bool)
        out[yy, xx] = True
        return out
    return None


def selfsup_masks(name: str, image: np.ndarray, lesion: np.ndarray | None, bank: list[np.ndarray], n: int,
                  seed: int, margin: int) -> list[np.ndarray]:
    """Up to ``n`` repaint masks for one scan (fewer when placements keep failing); deterministic in (name, seed)."""
    from negdpo.core.config import derive_seed

    forbidden = None
    if lesion is not None and lesion.any():
        forbidden = ndimage.binary_dilation(lesion, iterations=margin) if margin > 0 else lesion
    out = []
    for j in range(n):
        rng = np.random.default_rng(derive_seed("selfsup", name, j, base=seed))
        placed = place_mask(random_pose(bank[int(rng.integers(len(bank)))], rng), image, forbidden, rng)
        if placed is not None:
            out.append(placed)
    return out


def selfsup_pairs(root: str | Path, split: str, size: int, *, bank: list[np.ndarray] | None = None,
                  per_image: int = 4, seed: int = 0, margin: int = 4, include_negatives: bool | None = None,
                  include_positives: bool = True, limit: int | None = None) -> list[Pair]:
    """Self-supervised repaint pairs of ``split`` (chosen = rejected = source = the original scan).

    ``bank``: the lesion-mask shapes (default: the training split's masks). ``include_negatives``: add the
    scans of ``negatives/`` not already in the split (default: only for ``train``, where they belong).
    ``limit`` caps the number of pairs.
    """
    from negdpo.core.imageio import read_scan, stem_of
    from negdpo.core.scans import ScanFolder

    bank = bank if bank is not None else lesion_mask_bank(root, "train")
    if not bank:
        raise PairDataError(f"{root}: no lesion masks in train_masks/ to draw repaint masks from")
    folder = ScanFolder(root, on_error="skip", read_twins=False)
    scans: list[tuple[str, np.ndarray, np.ndarray | None, str]] = []
    for scan in folder.iter_split(split):
        if scan.positive and not include_positives:
            continue
        scans.append((scan.name, scan.image, scan.mask if scan.positive else None, scan.prompt or ""))
    if include_negatives if include_negatives is not None else split == "train":
        have = {stem_of(Path(n)) for n, *_ in scans}
        prompts = folder.prompts
        for path in folder.negatives():
            if stem_of(path) not in have:
                scans.append((f"negatives/{path.name}", read_scan(path, window=folder.window), None,
                              prompts.get(path.name, prompts.get(stem_of(path), ""))))
    pairs: list[Pair] = []
    for name, image, lesion, prompt in scans:
        img = _rgb(image, size)
        for j, m in enumerate(selfsup_masks(name, image, lesion, bank, per_image, seed, margin)):
            mm = _mask(m, size)
            if mm.any():
                pairs.append(Pair(f"{name}#selfsup{j}", img, mm, img, img, prompt, 0.0))
            if limit is not None and len(pairs) >= limit:
                return pairs
    if folder.skipped:
        logger.warning("%s", folder.report())
    if not pairs:
        raise PairDataError(f"{root}: no self-supervised pairs in split '{split}' (no scans, or no mask placement "
                            "fits away from the lesions)")
    logger.info("%d self-supervised pairs from %d scans of %s/%s", len(pairs), len(scans), root, split)
    return pairs
