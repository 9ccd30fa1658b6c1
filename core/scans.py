"""The MedCLIP-SAMv2 scan folder layout, paired by file name (never by listing order).

    <root>/{train,val,test}_images/<name>.<ext>     scans
    <root>/{train,val,test}_masks/<name>.<ext>      lesion masks (any non-zero pixel = lesion)
    <root>/{train,val,test}_twins/<name>.png        optional healthy twins (phantoms)
    <root>/negatives/<name>.<ext>                   optional healthy scans
    <root>/prompts.json                             optional {file name: text}

Images and masks are matched by stem, so ``a.jpg`` pairs with ``a.png``; two files with one stem in
a folder (``a.png`` + ``a.jpg``) are ambiguous and never paired. Problems (missing mask, size
mismatch of mask or twin, unreadable image/mask/twin, duplicate stem) raise a ``ScanFolderError``
naming the file, or with ``on_error="skip"`` are skipped and counted in ``ScanFolder.skipped``. A
malformed ``prompts.json`` always raises (its name and the problem in the message).

Reading options (every command that reads scans passes them, ``negdpo.core.window.ScanReading``): an
intensity ``window``, the size limit ``max_side`` (larger scans are refused, or shrunk with ``downscale``),
and ``square="pad"`` (default): a non-square image, its mask and twin are padded with zeros at the bottom or
right to a square, never stretched, so a pixel keeps its coordinates (docs/method.md#square-scans).

Formulas and sources: docs/method.md#scan-folder.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .imageio import MAX_SIDE, ScanReadError, is_scan_file, pad_to_square, read_mask, read_scan, stem_of
from .window import WindowLike

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
#: Split names that mean the dataset split ``validation`` (the scan folders' ``val``, the Hub's ``validation``).
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def dataset_split(name: str) -> str:
    """The dataset split of a folder or user split name: ``val`` (``valid``, ``dev``) -> ``validation``, others
    unchanged."""
    return SPLIT_ALIASES.get(str(name), str(name))


def split_matches(name: str, wanted: str) -> bool:
    """Whether split ``name`` is ``wanted`` (``val`` and ``validation`` are one split)."""
    return dataset_split(name) == dataset_split(wanted)


def read_meta(root: str | Path) -> dict[str, dict]:
    """``meta.csv`` rows by file name (empty when absent)."""
    path = Path(root) / "meta.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "file" not in rows[0]:
        raise ValueError(f"{path}: no 'file' column (have {sorted(rows[0])})")
    return {r["file"]: r for r in rows}


class ScanFolderError(ValueError):
    """A problem with the scan folder; the message names the offending file or directory."""


class MissingMaskError(ScanFolderError):
    pass


class SizeMismatchError(ScanFolderError):
    pass


class EmptyFolderError(ScanFolderError):
    pass


class DuplicateStemError(ScanFolderError):
    pass


def read_prompts(path: str | Path) -> dict[str, str]:
    """A ``{file name: text}`` JSON file; errors name the file and the problem."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScanFolderError(f"{path}: prompts file does not exist") from None
    except json.JSONDecodeError as err:
        raise ScanFolderError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScanFolderError(f"{path}: unreadable prompts file ({err})") from None
    if not isinstance(table, dict):
        raise ScanFolderError(f"{path}: expected a JSON object {{\"file name\": \"text\"}}, "
                              f"got a JSON {type(table).__name__}")
    for key, text in table.items():
        if not isinstance(text, str):
            raise ScanFolderError(f"{path}: the prompt for '{key}' is not text ({type(text).__name__})")
    return table


@dataclass
class Scan:
    """One image with its mask (bool, H x W) and optional healthy twin."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    image_path: Path
    mask_path: Path | None
    split: str
    twin: np.ndarray | None = None
    prompt: str | None = None
    original_size: tuple[int, int] | None = None  # (H, W) as read, before padding to a square

    @property
    def positive(self) -> bool:
        return bool(self.mask.any())


@dataclass
class ScanFolder:
    """Reader for one scan folder root."""

    root: Path
    window: WindowLike | None = None
    on_error: Literal["raise", "skip"] = "raise"
    read_twins: bool = True  # False: never touch ``<split>_twins/`` (twin-free training)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_side: int = MAX_SIDE
    downscale: bool = False
    square: Literal["pad", "keep"] = "pad"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise ScanFolderError(f"{self.root}: scan folder does not exist")
        self._prompts: dict[str, str] | None = None

    # -- listing -------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        return [s for s in SPLITS if (self.root / f"{s}_images").is_dir()]

    def image_files(self, split: str) -> list[Path]:
        folder = self.root / f"{split}_images"
        if not folder.is_dir():
            raise EmptyFolderError(f"{folder}: image directory does not exist")
        files = sorted(p for p in folder.iterdir() if is_scan_file(p))
        if not files:
            raise EmptyFolderError(f"{folder}: no images found (expected .png/.jpg/.dcm/.nii files)")
        return files

    @staticmethod
    def _group_by_stem(files: list[Path]) -> dict[str, list[Path]]:
        groups: dict[str, list[Path]] = {}
        for p in sorted(files):
            groups.setdefault(stem_of(p), []).append(p)
        return groups

    @staticmethod
    def _duplicate_error(paths: list[Path]) -> DuplicateStemError:
        names = " and ".join(f"'{p.name}'" for p in paths)
        return DuplicateStemError(f"{paths[0]}: {names} in {paths[0].parent} share the name '{stem_of(paths[0])}' "
                                  "(files pair, and outputs are named, by the name without extension); "
                                  "rename or remove one")

    def _by_stem(self, folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
        """Unique stems -> file, and duplicated stems -> their files."""
        if not folder.is_dir():
            return {}, {}
        groups = self._group_by_stem([p for p in folder.iterdir() if is_scan_file(p)])
        return ({k: v[0] for k, v in groups.items() if len(v) == 1},
                {k: v for k, v in groups.items() if len(v) > 1})

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        """(image, mask) paths matched by stem; a missing or ambiguous mask or image raises or is skipped."""
        masks, dup_masks = self._by_stem(self.root / f"{split}_masks")
        out: list[tuple[Path, Path | None]] = []
        for stem, imgs in self._group_by_stem(self.image_files(split)).items():
            if len(imgs) > 1:
                self._fail(self._duplicate_error(imgs))
                continue
            img = imgs[0]
            if stem in dup_masks:
                self._fail(self._duplicate_error(dup_masks[stem]))
                continue
            mask = masks.get(stem)
            if mask is None:
                self._fail(MissingMaskError(
                    f"{img}: no mask named '{stem}.*' in {self.root / f'{split}_masks'}"))
                continue
            out.append((img, mask))
        return out

    @property
    def prompts(self) -> dict[str, str]:
        if self._prompts is None:
            path = self.root / "prompts.json"
            self._prompts = read_prompts(path) if path.exists() else {}
        return self._prompts

    # -- reading -------------------------------------------------------------------------------
    def _fail(self, err: Exception) -> None:
        if self.on_error == "raise":
            raise err
        name = str(err).split(":", 1)[0]
        self.skipped.append((name, str(err)))
        logger.warning("skipping %s", err)

    def load(self, image_path: Path, mask_path: Path | None, split: str) -> Scan | None:
        """Read one pair (and its twin, if any); returns None (and records why) when skipping."""
        twin_path = self.root / f"{split}_twins" / f"{stem_of(image_path)}.png"
        size = {"max_side": self.max_side, "downscale": self.downscale}
        try:
            image = read_scan(image_path, window=self.window, **size)
            mask = read_mask(mask_path, **size) if mask_path is not None else np.zeros(image.shape[:2], bool)
            twin = read_scan(twin_path, **size) if self.read_twins and twin_path.exists() else None
        except ScanReadError as err:
            self._fail(ScanFolderError(str(err)))
            return None
        for path, shape, what in ((mask_path, mask.shape, "mask"),
                                  (twin_path, None if twin is None else twin.shape[:2], "twin")):
            if shape is not None and shape != image.shape[:2]:
                turned = shape == image.shape[:2][::-1] and shape[0] != shape[1]
                hint = ("; it is the image turned by 90 degrees: volumes are shown in the display orientation "
                        "(docs/method.md#display-orientation), draw the mask on that view") if turned else ""
                self._fail(SizeMismatchError(
                    f"{path}: {what} size {shape[1]}x{shape[0]} does not match image "
                    f"{image_path.name} size {image.shape[1]}x{image.shape[0]} (W x H){hint}"))
                return None
        prompts = self.prompts
        original_size = (int(image.shape[0]), int(image.shape[1]))
        if self.square == "pad":
            image, mask = pad_to_square(image), pad_to_square(mask)
            twin = None if twin is None else pad_to_square(twin)
        return Scan(name=image_path.name, image=image, mask=mask, image_path=image_path,
                    mask_path=mask_path, split=split, twin=twin,
                    prompt=prompts.get(image_path.name, prompts.get(stem_of(image_path))),
                    original_size=original_size)

    def iter_split(self, split: str) -> Iterator[Scan]:
        for img, mask in self.pairs(split):
            scan = self.load(img, mask, split)
            if scan is not None:
                yield scan

    def load_split(self, split: str) -> list[Scan]:
        return list(self.iter_split(split))

    def negatives(self) -> list[Path]:
        """Healthy scans in ``negatives/`` (duplicate stems raise or are skipped, as for images)."""
        folder = self.root / "negatives"
        unique, dups = self._by_stem(folder)
        for paths in dups.values():
            self._fail(self._duplicate_error(paths))
        return sorted(unique.values())

    def report(self) -> str:
        if not self.skipped:
            return "no files skipped"
        lines = [f"{len(self.skipped)} file(s) skipped:"] + [f"  {why}" for _, why in self.skipped]
        return "\n".join(lines)
