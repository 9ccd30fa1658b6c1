"""``negdpo import busi SRC``: the Breast Ultrasound Images dataset (BUSI) in its original layout.

    SRC/benign/benign (1).png  SRC/benign/benign (1)_mask.png  [SRC/benign/benign (1)_mask_1.png ...]
    SRC/malignant/...          SRC/normal/normal (1).png + normal (1)_mask.png (empty)

Masks of one image (``_mask``, ``_mask_1``, ...) are united. ``normal`` images are healthy scans. BUSI has no
patient ids, so each image is its own subject; subjects are split within each class, so every split holds
benign, malignant and normal images (docs/method.md#importers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..imageio import IMAGE_SUFFIXES, read_mask, read_raster, suffix_of
from ..window import reading_options
from .common import Case, Format, Record, SourceError, gray_if_equal

CLASSES = ("benign", "malignant", "normal")
MASK = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")


def _load(cfg: Any, image: Path, masks: list[Path], label: str) -> list[Record]:
    reading = reading_options(cfg)
    size = {"max_side": reading["max_side"], "downscale": reading["downscale"]}
    img = gray_if_equal(read_raster(image, window=reading["window"], **size))
    mask = np.zeros(img.shape[:2], bool)
    for m in masks:
        part = read_mask(m, **size)
        if part.shape != mask.shape:
            raise SourceError(f"{m}: mask size {part.shape[1]}x{part.shape[0]} does not match {image.name} "
                              f"{mask.shape[1]}x{mask.shape[0]} (W x H)")
        mask |= part
    if label == "normal":
        if mask.any():
            raise SourceError(f"{masks[0]}: a 'normal' image with a non-empty mask; move it to benign/ or malignant/")
        label = ""
    return [Record(name=image.stem, image=img, mask=mask, label=label, source=f"{image.parent.name}/{image.name}")]


def busi_cases(cfg: Any) -> list[Case]:
    src = Path(cfg.src)
    folders = [src / c for c in CLASSES if (src / c).is_dir()]
    if not folders:
        raise SourceError(f"{src}: expected the folders {', '.join(CLASSES)} of the BUSI dataset")
    cases = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and suffix_of(p) in IMAGE_SUFFIXES)
        masks: dict[str, list[Path]] = {}
        images = []
        for p in files:
            m = MASK.match(p.stem)
            (masks.setdefault(m["stem"], []).append(p) if m else images.append(p))
        for image in images:
            found = sorted(masks.pop(image.stem, []))
            if not found:
                raise SourceError(f"{image}: no mask '{image.stem}_mask.png' beside it")
            cases.append(Case(f"{folder.name}/{image.stem}",
                              lambda i=image, f=found, c=folder.name: _load(cfg, i, f, c), str(image), folder.name))
        if masks:
            orphan = next(iter(masks.values()))[0]
            raise SourceError(f"{orphan}: a mask without its image '{MASK.match(orphan.stem)['stem']}.png'")
    return cases


BUSI = Format("busi", "SRC/{benign,malignant,normal}/NAME.png + NAME_mask.png (+ NAME_mask_1.png ...)",
              "us", "breast", "a breast ultrasound image showing a {label} tumor",
              "a breast ultrasound image with no tumor", busi_cases)
