"""The work units of a pair build: one *item* per scan (image + mask), with its subject-level split.

An item is keyed ``<folder split>/<stem>`` (the scan folder's ``val`` stays ``val`` in keys and pair
ids); its ``split`` is the dataset split (``train`` / ``validation`` / ``test``). Splits are the
folder's, checked to be subject-level (``meta.csv`` or ``subject_pattern`` gives the subject);
``resplit`` reassigns them by a hash of the subject instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from negdpo.core.prompts import folder_healthy_texts
from negdpo.core.scans import dataset_split, read_meta

from .config import BuildConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    key: str  # <folder split>/<stem>
    split: str  # dataset split (subject-level): train / validation / test
    file: str  # image path relative to the data root
    image_path: str
    mask_path: str | None
    folder_split: str
    subject_id: str
    modality: str


def hash_split(subject: str) -> str:
    """60/20/20 train/validation/test by a hash of the subject id."""
    u = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < 0.6 else ("validation" if u < 0.8 else "test")


def _folder_splits(folder, wanted: str | None) -> list[str]:
    present = folder.splits()
    if not present:
        raise ValueError(f"--data {folder.root}: no split folders (expected train_images/, val_images/ or "
                         "test_images/ with *_masks/ beside them)")
    if not wanted:
        return present
    out = []
    for s in (w.strip() for w in wanted.split(",") if w.strip()):
        match = [p for p in present if dataset_split(p) == dataset_split(s)]
        if not match:
            raise ValueError(f"--splits: no '{s}_images' folder in {folder.root} (present: {present})")
        out += match
    return out


def list_items(cfg: BuildConfig) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items sorted by (split, key) plus listing-time skips (missing masks). Checks subject-level splits."""
    from negdpo.core.imageio import stem_of
    from negdpo.core.scans import ScanFolder

    root = Path(cfg.data)
    from negdpo.core.window import reading_options

    folder = ScanFolder(root, on_error="skip", **reading_options(cfg))
    meta = read_meta(root)
    pattern = re.compile(cfg.subject_pattern) if cfg.subject_pattern else None
    items: list[Item] = []
    for split in _folder_splits(folder, cfg.splits):
        pairs = folder.pairs(split)
        if cfg.limit is not None:
            pairs = pairs[: cfg.limit]
        for img, mask in pairs:
            stem = stem_of(img)
            row = meta.get(img.name, {})
            subject = row.get("subject_id") or stem
            if pattern is not None:
                m = pattern.search(stem)
                if m is None:
                    raise ValueError(f"{img}: --subject_pattern '{cfg.subject_pattern}' does not match '{stem}'")
                subject = m.group(1) if m.groups() else m.group(0)
            items.append(Item(key=f"{split}/{stem}", split=hash_split(subject) if cfg.resplit else dataset_split(split),
                              file=str(img.relative_to(root)), image_path=str(img),
                              mask_path=str(mask) if mask else None, folder_split=split, subject_id=subject,
                              modality=row.get("modality") or "unknown"))
    check_subject_splits(items)
    items.sort(key=lambda it: (it.split, it.key))
    skipped = list(folder.skipped)
    for split in folder.splits():
        skipped += broken_links(root / f"{split}_images") + broken_links(root / f"{split}_masks")
    unmatched = unmatched_prompts(root, folder.prompts)
    if unmatched:
        logger.warning("%s: %d key(s) match no image, e.g. %s; their prompts are not used", root / "prompts.json",
                       len(unmatched), ", ".join(repr(k) for k in unmatched[:3]))
    return items, skipped


def broken_links(folder: Path) -> list[tuple[str, str]]:
    """(file, reason) for the scan-named entries of ``folder`` that are not readable files (a symlink whose
    target is missing or is a folder): the listing leaves them out, so they are reported."""
    from negdpo.core.imageio import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, suffix_of

    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.is_file() and suffix_of(p) in IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES:
            out.append((str(p), f"{p}: symlink to {os.readlink(p)}, which is not a readable file; skipped"))
    return out


def unmatched_prompts(root: Path, prompts: dict[str, str]) -> list[str]:
    """``prompts.json`` keys that name no image (by file name or stem) in any ``*_images/`` or ``negatives/``."""
    from negdpo.core.imageio import stem_of

    names: set[str] = set()
    for d in [*root.glob("*_images"), root / "negatives"]:
        if d.is_dir():
            for p in d.iterdir():
                names.update((p.name, stem_of(p)))
    return sorted(k for k in prompts if k not in names)


def check_subject_splits(items: Iterable[Item]) -> None:
    """Raise if a subject appears in more than one split (slice leakage)."""
    where: dict[str, set[str]] = defaultdict(set)
    for it in items:
        where[it.subject_id].add(it.split)
    leaks = {s: sorted(v) for s, v in where.items() if len(v) > 1}
    if leaks:
        some = ", ".join(f"{s}: {v}" for s, v in list(leaks.items())[:5])
        raise ValueError(f"{len(leaks)} subject(s) appear in several splits ({some}); fix the folder, "
                         "give --subject_pattern, or pass --resplit to assign splits by subject")


def healthy_texts(root: Path, default: str | None) -> dict[str, str]:
    """Per-modality healthy text: ``default`` for all, else the rule of :func:`negdpo.core.prompts.folder_healthy_texts`
    over the healthy scans of meta.csv (``positive`` = 0), keyed by its ``modality`` column."""
    if default:
        return defaultdict(lambda: default)
    from negdpo.core.scans import ScanFolder

    meta = read_meta(root)
    prompts = ScanFolder(root, on_error="skip").prompts  # a malformed prompts.json raises, naming it
    healthy = [name for name, row in meta.items() if str(row.get("positive")) == "0"]
    return folder_healthy_texts(prompts, healthy, lambda name: meta[name].get("modality") or "unknown")
