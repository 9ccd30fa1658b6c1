"""Generator preference pairs: from a scan folder (on the fly) or a pair dataset (docs/method.md#pairs).

Scan folder: for every positive, source = the positive, rejected = the positive itself (the tumour is the
thing to remove), chosen = a healthy fill: the phantom's healthy twin when present, otherwise a classical
inpainting bootstrap (OpenCV Telea inside the dilated mask). Healthy scans (``negatives/`` or empty masks)
can be added for SFT with a random blob mask (chosen = rejected = the scan).

HF dataset: a pair build folder (its ``generator`` config), a ``save_to_disk`` folder or parquet files with
columns ``source, mask, chosen, rejected, prompt`` (+ optional ``difficulty``, ``split``, ``pair_id``); images
as ``datasets.Image``. The dataset split ``validation`` and the scan folder's ``val`` are one split.

Batches are drawn statelessly: the indices, augmentation, timesteps and noise of (step, micro-step, rank)
come from a generator seeded by those keys, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from negdpo.core.fill import classical_fill
from negdpo.core.scans import split_matches
from PIL import Image

logger = logging.getLogger(__name__)


class PairDataError(ValueError):
    """A problem with the pair data; the message names the item."""


@dataclass
class Pair:
    name: str
    source: np.ndarray  # float [0,1], (S,S,3)
    mask: np.ndarray  # bool (S,S)
    chosen: np.ndarray
    rejected: np.ndarray
    prompt: str
    difficulty: float = 0.0


def _rgb(img: np.ndarray, size: int) -> np.ndarray:
    arr = np.clip(np.asarray(img, np.float32), 0, 1)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[:2] != (size, size):
        pil = Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(pil, np.float32) / 255.0
    return arr


def _mask(mask: np.ndarray, size: int) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > (127 if m.dtype == np.uint8 else 0.5 if m.dtype.kind == "f" else 0)
    if m.shape != (size, size):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return m


def _difficulty(chosen: np.ndarray, rejected: np.ndarray, mask: np.ndarray) -> float:
    """Higher = harder: 1 - normalised mean |chosen - rejected| inside the mask (subtle lesions are hard)."""
    gap = float(np.abs(chosen - rejected)[mask].mean()) if mask.any() else 0.0
    return float(np.clip(1.0 - 4.0 * gap, 0.0, 1.0))


def random_blob_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A random ellipse covering ~2-8 % of the image (for SFT on healthy scans)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.08, 0.16) * w
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def pairs_from_scan_folder(root: str | Path, split: str, size: int, chosen: str = "auto",
                           include_healthy: bool = False, limit: int | None = None,
                           reading: dict | None = None) -> list[Pair]:
    """Pairs for every positive of ``split``; ``chosen``: auto (twin, else classical) | twin | classical."""
    from negdpo.core.config import derive_seed
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(root, on_error="skip", **(reading or {}))  # reading: ScanReading.reading()
    pairs: list[Pair] = []
    n_healthy = 0
    for scan in folder.iter_split(split):
        if not scan.positive:
            if include_healthy:
                m = random_blob_mask(scan.mask.shape, derive_seed("blob", scan.name))
                img = _rgb(scan.image, size)
                pairs.append(Pair(scan.name, img, _mask(m, size), img, img, scan.prompt or "", 0.0))
                n_healthy += 1
            continue
        if chosen == "twin" and scan.twin is None:
            raise PairDataError(f"{scan.image_path}: no healthy twin in {split}_twins/ (use chosen='classical')")
        fill = scan.twin if (scan.twin is not None and chosen in ("auto", "twin")) else classical_fill(
            scan.image if scan.image.ndim == 2 else scan.image, scan.mask)
        m = _mask(scan.mask, size)
        if not m.any():
            raise PairDataError(f"{scan.image_path}: lesion mask vanishes at {size} px; use a larger resolution")
        c, r = _rgb(fill, size), _rgb(scan.image, size)
        pairs.append(Pair(scan.name, r, m, c, r, scan.prompt or "", _difficulty(c, r, m)))
        if limit is not None and len(pairs) >= limit:
            break
    if folder.skipped:
        logger.warning("%s", folder.report())
    if not pairs:
        raise PairDataError(f"{root}: no positive scans (non-empty masks) in split '{split}'")
    logger.info("%d pairs from %s/%s (%d healthy SFT items)", len(pairs), root, split, n_healthy)
    return pairs


# The pair builder's output (a Hub-style dataset repo, negdpo.preference.pairs.schema): the generator config
# is ``OUT/generator`` (save_to_disk) and ``OUT/data/generator/*.parquet``; builds before that layout
# wrote ``OUT/dataset`` and ``OUT/data/*.parquet``. The dataset split ``validation`` is the folder's ``val``.
_SAVED = ("generator", "dataset")
_SHARDS = ("data/generator", "data")


def _is_saved(p: Path) -> bool:
    return any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def is_hf_dataset(path: str | Path) -> bool:
    p = Path(path)
    return _is_saved(p) or p.suffix == ".parquet" or any(p.glob("*.parquet")) or \
        any(_is_saved(p / d) for d in _SAVED) or any(any((p / d).glob("*.parquet")) for d in _SHARDS)


def _img_array(v, where: str, key: str) -> np.ndarray:
    if v is None:
        raise PairDataError(f"{where} has no '{key}' image")
    a = np.asarray(v.convert("RGB") if isinstance(v, Image.Image) else v)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def _open_hf(path: str | Path):
    """A Dataset/DatasetDict from a save_to_disk folder, a build folder or parquet shards."""
    import datasets

    p = Path(path)
    saved = next((p / d for d in _SAVED if _is_saved(p / d)), p if _is_saved(p) else None)
    if saved is not None:
        return datasets.load_from_disk(str(saved))
    if p.suffix == ".parquet":
        files = [str(p)]
    else:
        folder = next((q for q in (p, *(p / d for d in _SHARDS)) if any(q.glob("*.parquet"))), None)
        files = sorted(str(f) for f in folder.glob("*.parquet")) if folder is not None else []
    if not files:
        raise PairDataError(f"{path}: neither a save_to_disk folder nor parquet shards")
    return datasets.load_dataset("parquet", data_files=files, split="train")


def load_hf_pairs(path: str | Path, split: str | None, size: int, limit: int | None = None) -> list[Pair]:
    """Pairs from a pair build folder (``OUT``), a ``save_to_disk`` folder or parquet shards.

    ``split`` ``val`` and ``validation`` are the same split.
    """
    import datasets

    ds = _open_hf(path)
    if isinstance(ds, datasets.DatasetDict):
        key = next((k for k in ds if split and split_matches(k, split)), "train" if "train" in ds else next(iter(ds)))
        ds = ds[key]
    need = {"source", "mask", "chosen", "rejected"}
    missing = need - set(ds.column_names)
    if missing:
        raise PairDataError(f"{path}: missing column(s) {sorted(missing)}; have {ds.column_names}")
    if split and "split" in ds.column_names:
        ds = ds.filter(lambda s: split_matches(s, split), input_columns="split")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    pairs = []
    for i, row in enumerate(ds):
        name = str(row.get("pair_id") or i)

        def arr(v, key, name=name):
            return _img_array(v, f"{path}: row {name}", key)

        m = row["mask"]
        m = _mask(np.asarray(m.convert("L")) if isinstance(m, Image.Image) else np.asarray(m), size)
        if not m.any():
            raise PairDataError(f"{path}: row {name} has an empty mask")
        pairs.append(Pair(name, _rgb(arr(row["source"], "source"), size), m, _rgb(arr(row["chosen"], "chosen"), size),
                          _rgb(arr(row["rejected"], "rejected"), size), str(row.get("prompt") or ""),
                          float(row.get("difficulty") or 0.0)))
    if not pairs:
        raise PairDataError(f"{path}: no pairs{f' in split {split}' if split else ''}")
    return pairs


def load_pairs(data: str | Path, split: str, size: int, chosen: str = "auto", include_healthy: bool = False,
               limit: int | None = None, reading: dict | None = None) -> list[Pair]:
    """Pairs of ``split`` from a pair dataset (see ``load_hf_pairs``) or a scan folder (on the fly)."""
    if is_hf_dataset(data):
        return load_hf_pairs(data, split, size, limit)
    if not (Path(data) / f"{split}_images").is_dir() and split_matches(split, "val"):
        split = "val"  # the dataset split 'validation' is the scan folder's val_images
    return pairs_from_scan_folder(data, split, size, chosen, include_healthy, limit, reading)


class Curriculum:
    """Curriculum DPO: pairs sorted easy -> hard in ``stages`` groups; stage k samples groups 1..k.

    The stage advances every ``every`` optimizer steps (0 or stages <= 1: uniform over all pairs).
    """

    def __init__(self, difficulties: list[float], stages: int = 1, every: int = 0):
        self.order = np.argsort(np.asarray(difficulties), kind="stable")
        self.stages = max(1, int(stages))
        self.every = int(every)

    def stage(self, step: int) -> int:
        if self.stages <= 1 or self.every <= 0:
            return self.stages - 1
        return min(self.stages - 1, step // self.every)

    def pool(self, step: int) -> np.ndarray:
        n = len(self.order)
        k = self.stage(step) + 1
        return self.order[: max(1, int(round(n * k / self.stages)))]


def to_tensors(pairs: list[Pair], flips: np.ndarray) -> dict[str, torch.Tensor]:
    """Stack pairs as tensors; ``flips[i]`` flips ALL of pair i's images jointly (aligned pairs stay aligned)."""

    def stack(key: str) -> torch.Tensor:
        arrs = [getattr(p, key)[:, ::-1] if f else getattr(p, key) for p, f in zip(pairs, flips)]
        t = torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrs]))
        return t.float().unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).float() * 2.0 - 1.0

    return {"source": stack("source"), "chosen": stack("chosen"), "rejected": stack("rejected"),
            "mask": stack("mask")}
