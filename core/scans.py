"""The MedCLIP-SAMv2 scan folder layout, paired by file name (never by listing order).

    <root>/{train,val,test}_images/<name>.<ext>     scans
    <root>/{train,val,test}_masks/<name>.<ext>      lesion masks (any non-zero pixel = lesion)
    <root>/{train,val,test}_twins/<name>.png        optional healthy twins (phantoms)
    <root>/negatives/<name>.<ext>                   optional healthy scans
    <root>/prompts.json                             optional {file name: text}

Images and masks are matched by stem, so ``a.jpg`` pairs with ``a.png``. Problems raise a
``ScanFolderError`` naming the file, or with ``on_error="skip"`` are skipped and counted in
``ScanFolder.skipped``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .imageio import ScanReadError, Window, is_scan_file, read_mask, read_scan, stem_of

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class ScanFolderError(ValueError):
    """A problem with the scan folder; the message names the offending file or directory."""


class MissingMaskError(ScanFolderError):
    pass


class SizeMismatchError(ScanFolderError):
    pass


class EmptyFolderError(ScanFolderError):
    pass


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

    @property
    def positive(self) -> bool:
        return bool(self.mask.any())


@dataclass
class ScanFolder:
    """Reader for one scan folder root."""

    root: Path
    window: Window | None = None
    on_error: Literal["raise", "skip"] = "raise"
    skipped: list[tuple[str, str]] = field(default_factory=list)

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

    def _by_stem(self, folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        return {stem_of(p): p for p in folder.iterdir() if is_scan_file(p)}

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        """(image, mask) paths matched by stem; a missing mask raises or is skipped."""
        masks = self._by_stem(self.root / f"{split}_masks")
        out: list[tuple[Path, Path | None]] = []
        for img in self.image_files(split):
            mask = masks.get(stem_of(img))
            if mask is None:
                self._fail(MissingMaskError(
                    f"{img}: no mask named '{stem_of(img)}.*' in {self.root / f'{split}_masks'}"))
                continue
            out.append((img, mask))
        return out

    @property
    def prompts(self) -> dict[str, str]:
        if self._prompts is None:
            path = self.root / "prompts.json"
            self._prompts = json.loads(path.read_text()) if path.exists() else {}
        return self._prompts

    # -- reading -------------------------------------------------------------------------------
    def _fail(self, err: Exception) -> None:
        if self.on_error == "raise":
            raise err
        name = str(err).split(":", 1)[0]
        self.skipped.append((name, str(err)))
        logger.warning("skipping %s", err)

    def load(self, image_path: Path, mask_path: Path | None, split: str) -> Scan | None:
        """Read one pair; returns None (and records why) when skipping."""
        try:
            image = read_scan(image_path, window=self.window)
            mask = read_mask(mask_path) if mask_path is not None else np.zeros(image.shape[:2], bool)
        except ScanReadError as err:
            self._fail(ScanFolderError(str(err)))
            return None
        if mask.shape != image.shape[:2]:
            self._fail(SizeMismatchError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match image "
                f"{image_path.name} size {image.shape[1]}x{image.shape[0]} (W x H)"))
            return None
        twin_path = self.root / f"{split}_twins" / f"{stem_of(image_path)}.png"
        twin = read_scan(twin_path) if twin_path.exists() else None
        return Scan(name=image_path.name, image=image, mask=mask, image_path=image_path,
                    mask_path=mask_path, split=split, twin=twin,
                    prompt=self.prompts.get(image_path.name))

    def iter_split(self, split: str) -> Iterator[Scan]:
        for img, mask in self.pairs(split):
            scan = self.load(img, mask, split)
            if scan is not None:
                yield scan

    def load_split(self, split: str) -> list[Scan]:
        return list(self.iter_split(split))

    def negatives(self) -> list[Path]:
        folder = self.root / "negatives"
        return sorted(p for p in folder.iterdir() if is_scan_file(p)) if folder.is_dir() else []

    def report(self) -> str:
        if not self.skipped:
            return "no files skipped"
        lines = [f"{len(self.skipped)} file(s) skipped:"] + [f"  {why}" for _, why in self.skipped]
        return "\n".join(lines)
