"""What every importer shares: records, patient-level splits, prompts, the writer, ``meta.csv`` and the preview.

An importer lists ``Case``s (one per patient or image, cheap) and loads each case's ``Record``s (2-D images in
[0, 1] with a bool lesion mask) only when the writer reaches it, so memory holds one case at a time.
The writer pads every image and mask to a square at the bottom/right (docs/method.md#square-scans), saves them as
8-bit PNGs in the MedCLIP-SAMv2 layout and writes ``prompts.json``, ``meta.csv``, ``import.json`` and
``preview.png``. Layout and columns: docs/method.md#importers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import derive_seed
from ..imageio import ScanReadError, pad_to_square, save_png
from ..scans import SPLITS

logger = logging.getLogger(__name__)
OWNED = ("train_images", "train_masks", "val_images", "val_masks", "test_images", "test_masks", "negatives",
         "prompts.json", "meta.csv", "import.json", "preview.png")
META_COLUMNS = ["file", "subject_id", "split", "modality", "positive", "label", "source", "height", "width",
                "lesion_area"]
PREVIEW_ROWS = 8


class SourceError(ScanReadError):
    """A problem with the source data; the message names the file (``--on_error skip`` counts it)."""


@dataclass
class Record:
    """One 2-D scan: float [0, 1] (H, W) or (H, W, 3), its bool (H, W) lesion mask, and where it came from."""

    name: str  # output stem (made safe and unique by the writer)
    image: np.ndarray
    mask: np.ndarray
    label: str = ""  # lesion type for the prompt ('' = healthy)
    source: str = ""  # source file (and slice) for meta.csv

    @property
    def positive(self) -> bool:
        return bool(self.mask.any())


@dataclass
class Case:
    """One patient (or one image where the set has no patient ids): its id and a loader of its records."""

    subject: str
    load: Callable[[], Iterable[Record]]
    source: str = ""
    group: str = ""  # subjects are split within each group (BUSI: the class), so every split gets each group


@dataclass
class Format:
    """An importer: how to list cases, and the defaults of its prompts and names."""

    name: str
    help: str
    modality: str  # meta.csv modality
    prefix: str  # file-name prefix (the modality key saliency defaults read, e.g. 'breast', 'brain')
    template: str  # positive prompt, {label} and {modality} filled in
    healthy_template: str
    cases: Callable[[Any], list[Case]]


def split_subjects(subjects: Iterable[str], ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Each subject to one split (seeded permutation of the sorted ids; counts = rounded ratios, test and val
    first, at least one subject in every split with a non-zero ratio when there are enough subjects)."""
    ids = sorted(set(subjects))
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    counts = [int(round(r * n)) for r in ratios]
    for k in (2, 1):  # a non-zero ratio gets a subject when the set is large enough
        if ratios[k] > 0 and counts[k] == 0 and n >= 3:
            counts[k] = 1
    n_test, n_val = min(counts[2], n), min(counts[1], max(0, n - counts[2]))
    out = {}
    for i, sid in enumerate(order):
        out[sid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def safe_name(text: str) -> str:
    """A file-name stem of letters, digits, '.', '_' and '-' ('benign (1)' -> 'benign_1')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return name or "scan"


def fill_prompt(template: str, **fields: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt template {template!r}: only {{label}} and {{modality}} can be filled in "
                         f"({type(err).__name__}: {err})") from None


def gray_if_equal(image: np.ndarray) -> np.ndarray:
    """RGB with three equal channels (BUSI stores grayscale as RGB) -> (H, W); other images unchanged."""
    if image.ndim == 3 and all(np.array_equal(image[..., 0], image[..., c]) for c in range(1, image.shape[-1])):
        return np.ascontiguousarray(image[..., 0])
    return image


@dataclass
class Writer:
    """Writes records into ``out`` (already prepared by ``output_dir``) and keeps the tables."""

    out: Path
    fmt: Format
    healthy: str = "split"  # split | negatives | drop
    template: str | None = None
    healthy_template: str | None = None
    prefix: str | None = None
    modality: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    preview: list[tuple[str, str, np.ndarray, np.ndarray]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def unique(self, stem: str) -> str:
        prefix = safe_name(self.prefix if self.prefix is not None else self.fmt.prefix)
        base = safe_name(stem)
        base = base if not prefix or base.lower().startswith(prefix.lower() + "_") else f"{prefix}_{base}"
        name, k = base, 2
        while name.lower() in self._names:  # case-insensitive file systems
            name, k = f"{base}-{k}", k + 1
        self._names.add(name.lower())
        return name

    def write(self, rec: Record, subject: str, split: str) -> None:
        positive = rec.positive
        if not positive and self.healthy == "drop":
            return
        h, w = rec.image.shape[:2]
        image, mask = pad_to_square(np.clip(rec.image, 0.0, 1.0)), pad_to_square(rec.mask.astype(bool))
        name = self.unique(rec.name) + ".png"
        modality = self.modality or self.fmt.modality
        if positive or self.healthy == "split":
            save_png(self.out / f"{split}_images" / name, image)
            save_png(self.out / f"{split}_masks" / name, mask)
            where = split
        else:
            save_png(self.out / "negatives" / name, image)
            where = "negatives"
        template = (self.template or self.fmt.template) if positive else (self.healthy_template
                                                                          or self.fmt.healthy_template)
        self.prompts[name] = fill_prompt(template, label=rec.label or "tumor", modality=modality)
        self.rows.append({"file": name, "subject_id": subject, "split": where, "modality": modality,
                          "positive": int(positive), "label": rec.label if positive else "", "source": rec.source,
                          "height": h, "width": w, "lesion_area": int(rec.mask.sum())})
        if positive and len(self.preview) < PREVIEW_ROWS:
            self.preview.append((f"{where}: {rec.label or 'lesion'}", name, image, mask.astype(np.float32)))

    def finish(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Write prompts.json, meta.csv, import.json and preview.png; returns the counts."""
        if not self.rows:
            raise SourceError(f"{settings.get('src')}: no scans were imported (check the folder layout: "
                               f"`negdpo import {self.fmt.name} --help`)")
        _atomic_text(self.out / "prompts.json", json.dumps(self.prompts, indent=1, sort_keys=True))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=META_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_text(self.out / "meta.csv", buf.getvalue())
        counts = {where: {"positive": sum(r["positive"] for r in self.rows if r["split"] == where),
                          "healthy": sum(1 - r["positive"] for r in self.rows if r["split"] == where),
                          "subjects": len({r["subject_id"] for r in self.rows if r["split"] == where})}
                  for where in (*SPLITS, "negatives")}
        from ..config import code_version

        summary = {"format": self.fmt.name, "settings": settings, "counts": counts, "skipped": self.skipped,
                   "code_version": code_version()}
        _atomic_text(self.out / "import.json", json.dumps(summary, indent=1, default=str))
        if self.preview:
            from ..figures import write_grid

            write_grid(self.out / "preview.png", [[img, m] for _, _, img, m in self.preview],
                       column_labels=["image (padded to square)", "lesion mask"],
                       row_labels=[label for label, _, _, _ in self.preview],
                       tile_text=[[name, None] for _, name, _, _ in self.preview],
                       title=f"negdpo import {self.fmt.name}: {len(self.rows)} scans")
        return summary


def check_record(rec: Record) -> Record:
    if rec.mask.shape != rec.image.shape[:2]:
        raise SourceError(f"{rec.source}: mask size {rec.mask.shape[1]}x{rec.mask.shape[0]} does not match "
                          f"the image {rec.image.shape[1]}x{rec.image.shape[0]} (W x H)")
    return rec


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def run_import(fmt: Format, cfg: Any, out: Path) -> dict[str, Any]:
    """List the cases, split them by subject, load and write each; returns the ``import.json`` summary."""
    cases = fmt.cases(cfg)
    if not cases:
        raise SourceError(f"{cfg.src}: no {fmt.name} data found ({fmt.help})")
    groups: dict[str, set[str]] = {}
    for c in cases:
        groups.setdefault(c.group, set()).add(c.subject)
    split_of: dict[str, str] = {}
    ratios = (cfg.train_ratio, cfg.val_ratio, cfg.test_ratio)
    for group, subjects in sorted(groups.items()):  # a subject met in an earlier group keeps its split
        split_of.update(split_subjects(subjects - split_of.keys(), ratios, derive_seed(group, base=cfg.seed)))
    writer = Writer(out, fmt, healthy=cfg.healthy, template=cfg.prompt_template,
                    healthy_template=cfg.healthy_prompt, prefix=cfg.name_prefix, modality=cfg.modality)
    for case in cases:
        try:
            records = [check_record(rec) for rec in case.load()]
        except ScanReadError as err:
            if cfg.on_error != "skip":
                raise
            writer.skipped.append(str(err))
            logger.warning("skipping %s", err)
            continue
        for rec in records:
            writer.write(rec, case.subject, split_of[case.subject])
    return writer.finish(settings_of(cfg))


def settings_of(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(cfg), default=str))
