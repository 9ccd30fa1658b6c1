"""What the study reads from the phantom folder: subjects, lesion groups, held-out and pool positives,
image-level labels, and the harmonic-fill scan folder of the no-generator control."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from negdpo.core.fill import harmonic_fill
from negdpo.core.imageio import save_png, to_gray
from negdpo.core.scans import ScanFolder

GEN_REPAINT_DILATION = 2  # px the lesion mask is dilated by to give the repaint region (as in pair building)


def subject_of(name: str) -> str:
    """``mri_0003_1.png`` -> ``mri_0003``."""
    return Path(name).stem.rsplit("_", 1)[0]


def repaint_mask(mask: np.ndarray) -> np.ndarray:
    """The lesion mask dilated by :data:`GEN_REPAINT_DILATION` px: the region a generator repaints."""
    return ndimage.binary_dilation(mask, iterations=GEN_REPAINT_DILATION)


def held_out_positives(phantoms: Path) -> list:
    """Positives of the val and test subjects (the generators never trained on them)."""
    folder = ScanFolder(phantoms)
    return [s for split in ("val", "test") if split in folder.splits() for s in folder.load_split(split) if s.positive]


def lesion_groups(phantoms: Path) -> dict[str, str]:
    """{file: mri_bright | mri_dark | us} from ``meta.csv`` (older sets: from modality and contrast sign)."""
    out = {}
    with open(Path(phantoms) / "meta.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["positive"] != "1":
                continue
            group = r.get("group")
            if not group:
                group = "us" if r["modality"] == "us" else (
                    "mri_bright" if float(r["lesion_contrast"]) > 0 else "mri_dark")
            out[r["file"]] = group
    return out


def image_labels(phantoms: Path, split: str) -> dict[str, bool]:
    """{file: the report says tumour} of a split, from ``meta.csv`` (image-level labels, not masks)."""
    with open(Path(phantoms) / "meta.csv", newline="") as f:
        return {r["file"]: r["positive"] == "1" for r in csv.DictReader(f) if r["split"] == split}


def pool_positives(phantoms: Path, limit: int) -> list:
    """``min(limit, n)`` positives of the pre-training pool, evenly spaced in file order (both modalities stay in)."""
    pos = [s for s in ScanFolder(phantoms).load_split("pretrain") if s.positive]
    if limit <= 0 or not pos:
        return []
    return [pos[i] for i in np.unique(np.linspace(0, len(pos) - 1, min(limit, len(pos))).round().astype(int))]


def write_healthy_set(phantoms: Path, out: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A scan folder for MedCLIP-SAMv2's own DHN-NCE setting: each positive with its report, and in its "twin"
    slot an ordinary healthy scan of the same split and modality (a healthy subject's scan, cycled in file
    order; never the positive's own twin; a split without one borrows train's). DHN-NCE reads the (image, report) rows with in-batch negatives, so
    the slot only puts healthy scans with the healthy report in the batches; no counterfactual image is used.
    """
    folder = ScanFolder(phantoms)
    by_split = {split: folder.load_split(split) for split in dict.fromkeys((*splits, "train"))}

    def healthy_of(split: str) -> dict[str, list]:
        out: dict[str, list] = {}
        for s in by_split[split]:
            if not s.positive:
                out.setdefault(s.name.split("_", 1)[0], []).append(s)
        return out

    prompts = {}
    for split in splits:
        scans = by_split[split]
        # the split's own healthy scans of the modality; a small set may have none: then train's, then any modality's
        healthy, train = healthy_of(split), healthy_of("train")
        anyone = [s for group in (*healthy.values(), *train.values()) for s in group]
        used: dict[str, int] = {}
        for s in scans:
            modality = s.name.split("_", 1)[0]
            healthy[modality] = healthy.get(modality) or train.get(modality) or anyone
            if not s.positive or not healthy[modality]:
                continue
            k = used.get(modality, 0)
            used[modality] = k + 1
            save_png(out / f"{split}_images" / s.name, to_gray(s.image))
            save_png(out / f"{split}_masks" / s.name, s.mask)
            save_png(out / f"{split}_twins" / s.name, to_gray(healthy[modality][k % len(healthy[modality])].image))
            prompts[s.name] = s.prompt or ""
    healthy_texts = {k: v for k, v in folder.prompts.items() if " no " in f" {v.lower()}"}
    (out / "prompts.json").write_text(json.dumps(prompts | healthy_texts, indent=1, sort_keys=True))
    return out


def write_harmonic_set(phantoms: Path, out: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A scan folder whose twins are harmonic fills of the positives (the no-generator negatives).

    Positives only (CLIP-DPO pairs need a lesion); images, masks and prompts are the phantoms'.
    """
    folder = ScanFolder(phantoms)
    prompts = {}
    for split in splits:
        for s in folder.load_split(split):
            if not s.positive:
                continue
            save_png(out / f"{split}_images" / s.name, to_gray(s.image))
            save_png(out / f"{split}_masks" / s.name, s.mask)
            save_png(out / f"{split}_twins" / s.name, harmonic_fill(to_gray(s.image), repaint_mask(s.mask)))
            prompts[s.name] = s.prompt or ""
    healthy = {k: v for k, v in folder.prompts.items() if " no " in f" {v.lower()}"}  # healthy texts per modality
    (out / "prompts.json").write_text(json.dumps(prompts | healthy, indent=1, sort_keys=True))
    return out
