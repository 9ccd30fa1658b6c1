"""Training data for the prompt generator: images of a scan folder + targets from masks.

Targets come from ground truth (the scan folder's ``{split}_masks``), any mask folder, or a
``negdpo evaluate`` output folder (its ``masks/`` subfolder; with several checkpoints, one subfolder per
checkpoint, chosen with ``checkpoint``). Masks pair with images by file stem. Each connected component
(``mode="components"``) or each class (``mode="classes"``) of a mask is one target: a class label, a box
(cx, cy, w, h normalised to the image) and a binary mask in SAM's padded mask-prompt frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

TargetMode = Literal["components", "classes"]


def resolve_target_dir(data: str | Path, split: str, targets: str = "", checkpoint: str = "") -> Path:
    """Folder holding one mask per image: ``""``/``"gt"`` -> ground truth; an evaluate output -> its masks."""
    if targets in ("", "gt"):
        folder = Path(data) / f"{split}_masks"
    else:
        folder = Path(targets)
        if (folder / "masks").is_dir():  # a `negdpo evaluate` output folder
            folder = folder / "masks"
            subs = sorted(p for p in folder.iterdir() if p.is_dir())
            if checkpoint:
                folder = folder / checkpoint
            elif len(subs) > 1:
                raise ValueError(f"{folder}: masks of several checkpoints {[p.name for p in subs]}; choose one "
                                 "with targets_checkpoint")
            elif len(subs) == 1 and not any(p.is_file() for p in folder.iterdir()):
                folder = subs[0]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: target mask folder does not exist")
    return folder


def read_label_mask(path: Path, class_values: list[int] | None) -> np.ndarray:
    """(H, W) int labels: 0 background, k + 1 for class k. Without ``class_values`` any non-zero pixel is class 0."""
    from negdpo.core.imageio import read_mask

    if not class_values:
        return read_mask(path).astype(np.int64)
    from PIL import Image

    with Image.open(path) as im:
        raw = np.asarray(im)
    raw = raw[..., 0] if raw.ndim == 3 else raw
    out = np.zeros(raw.shape, np.int64)
    for k, v in enumerate(class_values):
        out[raw == v] = k + 1
    return out


def split_targets(labels: np.ndarray, mode: TargetMode = "components", min_area: int = 1) -> list[tuple[int, np.ndarray]]:
    """(class index, bool mask) per target: connected components (8-connected) of each class, or whole classes."""
    out = []
    for cls in sorted(int(v) for v in np.unique(labels) if v > 0):
        region = labels == cls
        if mode == "classes":
            parts = [region]
        elif mode == "components":
            comp, n = ndimage.label(region, structure=np.ones((3, 3), bool))
            parts = [comp == i for i in range(1, n + 1)]
        else:
            raise ValueError(f"target mode '{mode}': use components or classes")
        out += [(cls - 1, p) for p in parts if p.sum() >= min_area]
    return out


def box_of(mask: np.ndarray) -> np.ndarray:
    """Normalised cx, cy, w, h of a bool mask's pixel extent (pixel edges, so one pixel has width 1/W)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return np.array([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], np.float32)


def input_size(hw: tuple[int, int], img_size: int) -> tuple[int, int]:
    """SAM's resized (h', w'): longest side ``img_size`` (``ResizeLongestSide.get_preprocess_shape``)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], img_size)


def to_mask_frame(masks: np.ndarray, input_hw: tuple[int, int], img_size: int, mask_size: int) -> torch.Tensor:
    """(T, H, W) bool -> (T, L, L) float {0, 1} in SAM's padded mask-prompt frame."""
    if len(masks) == 0:
        return torch.zeros(0, mask_size, mask_size)
    h, w = (max(1, math.ceil(s * mask_size / img_size)) for s in input_hw)  # as PromptSAM.valid_mask
    t = F.interpolate(torch.as_tensor(masks, dtype=torch.float32)[:, None], size=(h, w), mode="bilinear",
                      align_corners=False)[:, 0]
    return F.pad((t >= 0.5).float(), (0, mask_size - w, 0, mask_size - h))


def preprocess_image(sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """[0, 1] grayscale/RGB (H, W[, 3]) -> SAM input (3, S, S) (resize, normalise, pad) and (h', w')."""
    from negdpo.core.imageio import to_rgb_uint8
    from segment_anything.utils.transforms import ResizeLongestSide

    rgb = ResizeLongestSide(sam.image_encoder.img_size).apply_image(to_rgb_uint8(image))
    x = torch.as_tensor(rgb, device=sam.device).permute(2, 0, 1).float()
    with torch.no_grad():
        return sam.preprocess(x).cpu(), (rgb.shape[0], rgb.shape[1])


def make_targets(labels: np.ndarray, input_hw: tuple[int, int], img_size: int, mask_size: int,
                 mode: TargetMode = "components", min_area: int = 1) -> dict[str, torch.Tensor]:
    parts = split_targets(labels, mode, min_area)
    masks = np.stack([m for _, m in parts]) if parts else np.zeros((0, *labels.shape), bool)
    boxes = np.stack([box_of(m) for _, m in parts]) if parts else np.zeros((0, 4), np.float32)
    return {"labels": torch.tensor([c for c, _ in parts], dtype=torch.long),
            "boxes": torch.as_tensor(boxes), "masks": to_mask_frame(masks, input_hw, img_size, mask_size)}


@dataclass
class Sample:
    name: str
    image: torch.Tensor  # (3, S, S) SAM input
    input_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    target: dict[str, torch.Tensor]
    features: dict[str, Any] | None = None


def load_samples(sam, data: str | Path, split: str = "train", targets: str = "", checkpoint: str = "",
                 class_values: list[int] | None = None, mode: TargetMode = "components", min_area: int = 1,
                 limit: int | None = None, reading: dict | None = None) -> list[Sample]:
    """Every image of ``data``'s split with its targets (an image without a target mask is an error)."""
    from negdpo.core.imageio import is_scan_file, stem_of
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(data, **(reading or {}))  # reading: ScanReading.reading()
    mask_dir = resolve_target_dir(data, split, targets, checkpoint)
    masks = {stem_of(p): p for p in mask_dir.iterdir() if is_scan_file(p)}
    img_size = sam.image_encoder.img_size
    mask_size = sam.prompt_encoder.mask_input_size[0]
    out = []
    for path in folder.image_files(split)[:limit]:
        mpath = masks.get(stem_of(path))
        if mpath is None:
            raise FileNotFoundError(f"{path}: no target mask named '{stem_of(path)}.*' in {mask_dir}")
        scan = folder.load(path, None, split)
        labels = read_label_mask(mpath, class_values)
        if labels.shape != scan.image.shape[:2]:
            raise ValueError(f"{mpath}: mask {labels.shape} does not match image {path.name} {scan.image.shape[:2]}")
        image, hw = preprocess_image(sam, scan.image)
        out.append(Sample(path.name, image, hw, labels.shape, make_targets(labels, hw, img_size, mask_size, mode,
                                                                          min_area)))
    if not out:
        raise ValueError(f"no images in {data} split '{split}'")
    return out


def collate(samples: list[Sample]) -> dict[str, Any]:
    batch: dict[str, Any] = {"names": [s.name for s in samples], "input_hw": torch.tensor([s.input_hw for s in samples]),
                             "targets": [s.target for s in samples]}
    if all(s.features is not None for s in samples):
        batch["features"] = {"blocks": [torch.stack([s.features["blocks"][k] for s in samples])
                                        for k in range(len(samples[0].features["blocks"]))],
                             "neck": torch.stack([s.features["neck"] for s in samples])}
    else:
        batch["images"] = torch.stack([s.image for s in samples])
    return batch
