"""``negdpo import brats SRC``: BraTS in its original layout, one folder per case.

    SRC/<case>/<case>_t1.nii.gz  _t1ce  _t2  _flair  _seg.nii.gz   (labels 0 background, 1, 2, 4)

``--sequence`` chooses the image (default flair); the lesion is any label, or the ``--labels`` subset (e.g. 1,4
= tumour core). Slices with lesion plus ``--healthy_slices`` lesion-free slices per case, canonical orientation
and one display orientation, one window per volume (``negdpo.core.importers.volumes``). Subject = case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..imageio import NIFTI_SUFFIXES, suffix_of
from .common import Case, Format, SourceError
from .volumes import volume_records

SEQUENCES = ("t1", "t1ce", "t2", "flair")


def _find(folder: Path, tag: str) -> Path | None:
    hits = [p for p in folder.iterdir() if suffix_of(p) in NIFTI_SUFFIXES
            and p.name.lower().split(".")[0].endswith(f"_{tag}")]
    return sorted(hits)[0] if hits else None


def brats_cases(cfg: Any) -> list[Case]:
    src = Path(cfg.src)
    if cfg.sequence not in SEQUENCES:
        raise ValueError(f"--sequence {cfg.sequence!r}: choose one of {list(SEQUENCES)}")
    folders = sorted(p for p in src.iterdir() if p.is_dir()) if src.is_dir() else []
    cases = []
    for folder in folders:
        image, seg = _find(folder, cfg.sequence), _find(folder, "seg")
        if image is None and seg is None:
            continue  # not a case folder
        if image is None or seg is None:
            missing = f"*_{cfg.sequence}.nii.gz" if image is None else "*_seg.nii.gz"
            raise SourceError(f"{folder}: no {missing} in this case folder")
        cases.append(Case(folder.name, lambda i=image, s=seg, c=folder.name:
                          volume_records(i, s, cfg, c, f"{c}_{cfg.sequence}", cfg.label_text or "glioma"),
                          str(folder)))
    if not cases:
        raise SourceError(f"{src}: no BraTS case folders (<case>/<case>_{cfg.sequence}.nii.gz + _seg.nii.gz)")
    return cases


BRATS = Format("brats", "SRC/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (labels 1, 2, 4)",
               "mri", "brain", "a brain MRI showing a {label}", "a brain MRI with no tumor", brats_cases)
