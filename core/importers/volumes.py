"""Volumes to slices (shared by ``brats`` and ``nifti``) and the generic ``nifti`` and ``dicom`` importers.

A volume and its label volume are reoriented to RAS+ (``nibabel.as_closest_canonical``), sliced along
``axis`` (2 = axial) and shown in the one display orientation (``negdpo.core.imageio.to_display``), image and
mask alike. Kept slices: every slice with at least ``min_lesion_px`` lesion voxels, plus ``healthy_slices``
lesion-free slices per volume drawn (seeded per subject) among those showing at least half the largest
anatomy cross-section. One window per volume (``--window``/``--window_preset``, else its 0.5-99.5
percentiles). docs/method.md#importers.

    nifti: SRC/images/<case>.nii[.gz] + SRC/labels/<case>.nii[.gz]   (also imagesTr/labelsTr, <case>_0000)
    dicom: SRC/images/**/<file>.dcm  + SRC/masks/**/<file>.png       (same relative path; subject = PatientID)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import derive_seed
from ..imageio import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ScanReadError,
    block_reduce,
    check_finite,
    downscale_factor,
    load_canonical_volume,
    read_dicom,
    read_mask,
    stem_of,
    suffix_of,
    to_display,
)
from ..window import PercentileWindow, reading_options
from .common import Case, Format, Record, SourceError


def lesion_of(labels: np.ndarray, subset: str | None) -> np.ndarray:
    """Bool lesion volume: any non-zero label, or only the labels listed in ``subset`` ('1,4')."""
    if not subset:
        return labels != 0
    try:
        wanted = [int(v) for v in str(subset).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels {subset!r}: expected integer labels such as 1,2,4") from None
    return np.isin(labels, wanted)


def _same_grid(img, lab, image_path: Path, label_path: Path) -> None:
    if img.shape[:3] != lab.shape[:3] or not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise SourceError(f"{label_path}: label volume {tuple(lab.shape)} does not share the voxel grid of "
                          f"{image_path.name} {tuple(img.shape)} (shape or affine differ); resample it first")


def volume_records(image_path: Path, label_path: Path, cfg: Any, subject: str, stem: str,
                   label_text: str) -> list[Record]:
    """The kept slices of one volume (see the module doc) as records named ``<stem>_<slice>``."""
    img, vol = load_canonical_volume(image_path)
    lab, labels = load_canonical_volume(label_path, "NIfTI label")
    _same_grid(img, lab, image_path, label_path)
    vol = np.asarray(vol, dtype=np.float32)
    check_finite(vol, image_path, "voxel")
    if vol.ndim != 3:
        raise SourceError(f"{image_path}: expected a 3-D volume, got shape {vol.shape}")
    labels = np.asarray(labels)
    lesion = lesion_of(labels, cfg.labels)
    labelled = np.count_nonzero(np.moveaxis(labels != 0, cfg.axis, 0).reshape(labels.shape[cfg.axis], -1), axis=1)
    axis = cfg.axis
    reading = reading_options(cfg)
    window = (reading["window"] or PercentileWindow()).resolve(vol)
    n = vol.shape[axis]
    area = np.count_nonzero(np.moveaxis(lesion, axis, 0).reshape(n, -1), axis=1)
    anatomy = np.count_nonzero(np.moveaxis(vol > vol.min(), axis, 0).reshape(n, -1), axis=1)
    keep = [k for k in range(n) if area[k] >= cfg.min_lesion_px]
    healthy = [k for k in range(n) if labelled[k] == 0 and anatomy[k] > 0 and anatomy[k] >= 0.5 * anatomy.max()]
    rng = np.random.default_rng(derive_seed(subject, stem, base=cfg.seed))
    take = min(cfg.healthy_slices, len(healthy))
    keep += sorted(rng.choice(healthy, size=take, replace=False).tolist()) if take else []
    factor = downscale_factor(image_path, *to_display(np.take(vol, 0, axis=axis)).shape, reading["max_side"],
                              reading["downscale"])
    out = []
    for k in sorted(keep):
        image = window.apply(block_reduce(to_display(np.take(vol, k, axis=axis)), factor))
        mask = block_reduce(to_display(np.take(lesion, k, axis=axis)), factor, majority=True)
        out.append(Record(name=f"{stem}_{k:03d}", image=image, mask=mask, label=label_text if area[k] else "",
                          source=f"{image_path.name}[{'xyz'[axis]}={k}]"))
    return out


def _subject(stem: str, pattern: str | None, where: Path) -> str:
    if not pattern:
        return stem
    m = re.search(pattern, stem)
    if m is None:
        raise ValueError(f"{where}: --subject_pattern {pattern!r} does not match '{stem}'")
    return m.group(1) if m.groups() else m.group(0)


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and suffix_of(p) in suffixes)


def nifti_cases(cfg: Any) -> list[Case]:
    src = Path(cfg.src)
    images_dir = next((src / d for d in ("images", "imagesTr") if (src / d).is_dir()), None)
    labels_dir = next((src / d for d in ("labels", "labelsTr") if (src / d).is_dir()), None)
    if images_dir is None or labels_dir is None:
        raise SourceError(f"{src}: expected images/ and labels/ folders of NIfTI volumes (or imagesTr/labelsTr)")
    labels = {stem_of(p): p for p in _files(labels_dir, NIFTI_SUFFIXES)}
    cases = []
    for path in _files(images_dir, NIFTI_SUFFIXES):
        stem = stem_of(path)
        key = stem if stem in labels else re.sub(r"_\d{4}$", "", stem)  # nnU-Net channel suffix
        if key not in labels:
            raise SourceError(f"{path}: no label volume named '{key}.nii[.gz]' in {labels_dir}")
        subject = _subject(stem, cfg.subject_pattern, path)
        cases.append(Case(subject, lambda p=path, q=labels[key], s=subject, t=stem:
                          volume_records(p, q, cfg, s, t, cfg.label_text or "tumor"), str(path)))
    return cases


def _dicom_subject(path: Path, images_dir: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:
        raise ScanReadError(f"{path}: unreadable DICOM ({err})") from err
    pid = str(getattr(ds, "PatientID", "") or "").strip()
    folder = path.parent.relative_to(images_dir)
    return pid or (folder.as_posix() if folder.parts else stem_of(path))


def dicom_cases(cfg: Any) -> list[Case]:
    src = Path(cfg.src)
    images_dir, masks_dir = src / "images", src / "masks"
    if not images_dir.is_dir():
        raise SourceError(f"{src}: expected images/ (DICOM files) and masks/ (PNG masks, same relative paths)")
    by_subject: dict[str, list[Path]] = {}
    for path in _files(images_dir, DICOM_SUFFIXES):
        subject = _subject(stem_of(path), cfg.subject_pattern, path) if cfg.subject_pattern else \
            _dicom_subject(path, images_dir)
        by_subject.setdefault(subject, []).append(path)

    def load(paths: list[Path]) -> list[Record]:
        reading = reading_options(cfg)
        out = []
        for path in paths:
            rel = path.relative_to(images_dir)
            found = [p for p in (masks_dir / rel.parent).glob(f"{stem_of(path)}.*") if suffix_of(p) in IMAGE_SUFFIXES]
            image = read_dicom(path, window=reading["window"], max_side=reading["max_side"],
                               downscale=reading["downscale"])
            if found:
                mask = read_mask(found[0], max_side=reading["max_side"], downscale=reading["downscale"])
            elif cfg.missing_mask == "healthy":
                mask = np.zeros(image.shape[:2], bool)
            else:
                raise SourceError(f"{path}: no mask {masks_dir / rel.parent / stem_of(path)}.png (add it, or pass "
                                  "--missing_mask healthy to import unmasked slices as healthy)")
            name = "_".join((*rel.parent.parts, stem_of(path)))
            out.append(Record(name=name, image=image, mask=mask, label=cfg.label_text or "tumor", source=str(rel)))
        return out

    return [Case(s, lambda p=paths: load(p), str(paths[0])) for s, paths in sorted(by_subject.items())]


NIFTI = Format("nifti", "SRC/images/<case>.nii.gz + SRC/labels/<case>.nii.gz (lesion = non-zero, or --labels)",
               "scan", "scan", "a {modality} showing a {label}", "a {modality} with no abnormality", nifti_cases)
DICOM = Format("dicom", "SRC/images/**/*.dcm + SRC/masks/**/<same name>.png; subject = DICOM PatientID",
               "scan", "scan", "a {modality} showing a {label}", "a {modality} with no abnormality", dicom_cases)
