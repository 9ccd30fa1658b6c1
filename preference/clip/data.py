"""CLIP preference pairs: from phantoms/scan folders (positive vs its healthy twin) or from the pair
builder's HF dataset (text->image rows), as one tensor-ready format.

One ``ClipPair`` = positive image x+ (lesion, mask), negative image x- (its tumour-free counterfactual),
lesion text y+ and healthy text y-. It yields the text->image term (y+: x+ over x-) and both image->text
terms (x+: y+ over y-; x-: y- over y+). Image preprocessing is the model's own deterministic ``preprocess``,
so reference similarities can be cached per pair (``ref_sims``; TRL names for the text->image term).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.imageio import to_rgb_uint8
from negdpo.core.prompts import FALLBACK_LESION_TEXT, default_healthy_text, folder_healthy_texts, modality_of
from negdpo.core.scans import ScanFolder, read_meta, split_matches
from negdpo.preference.pairs import schema
from PIL import Image

logger = logging.getLogger(__name__)
CLIP_KINDS = ("clip", "t2i", "text_to_image", "text2image", schema.KIND_T2I)  # kind prefixes of t2i rows


@dataclass
class ClipPair:
    pair_id: str
    positive: np.ndarray  # float [0,1] (H,W) or (H,W,3), or uint8
    negative: np.ndarray
    text_pos: str
    text_neg: str
    mask: np.ndarray | None = None  # bool (H,W) lesion mask of the positive
    ref_sims: list[float] | None = field(default=None)  # cached s_ref 2x2 block, row-major


def pairs_from_scans(root: str | Path, split: str, negative_text: str | None = None,
                     reading: dict | None = None) -> list[ClipPair]:
    """Positive scans with a healthy twin in ``split``: chosen = scan, rejected = twin (phantoms).
    ``reading``: ``ScanFolder`` options (``negdpo.core.window.ScanReading.reading``). The rejected text is
    ``negative_text`` or the healthy text of the scan's modality (``negdpo.core.prompts.folder_healthy_texts``
    over meta.csv's healthy scans, keyed by file-name prefix)."""
    folder = ScanFolder(root, **(reading or {}))
    healthy = [name for name, row in read_meta(folder.root).items() if str(row.get("positive")) == "0"]
    neg_texts = folder_healthy_texts(folder.prompts, healthy)
    pairs = []
    for scan in folder.load_split(split):
        if not scan.positive or scan.twin is None:
            continue
        neg = negative_text or neg_texts[modality_of(scan.name)]
        pairs.append(ClipPair(pair_id=f"{split}/{scan.name}", positive=scan.image, negative=scan.twin,
                              text_pos=scan.prompt or FALLBACK_LESION_TEXT, text_neg=neg,
                              mask=scan.mask))
    if not pairs:
        raise ValueError(f"{root}: no positive scans with healthy twins in split '{split}' "
                         f"(expected {split}_twins/); pass a pair dataset instead")
    return pairs


class PairDataError(ValueError):
    """A pair dataset that cannot be used; the message names the file (or the row) and why."""


def pairs_from_dataset(path: str | Path, split: str, negative_text: str | None = None) -> list[ClipPair]:
    """:func:`read_pair_dataset`; a dataset that cannot be read is a :class:`PairDataError` naming its file."""
    try:
        return read_pair_dataset(path, split, negative_text)
    except PairDataError:
        raise
    except Exception as err:  # truncated arrow/parquet, bad JSON, undecodable image bytes, ...
        where = getattr(err, "negdpo_row", None)
        bad = _unreadable_file(Path(path)) or Path(path)
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise PairDataError(f"{bad}: unreadable pair dataset{f' (row {where})' if where is not None else ''}: "
                            f"{type(err).__name__}: {reason}") from None


def _unreadable_file(path: Path) -> Path | None:
    """The first data file under ``path`` (itself, if a file) that does not read back in full."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        try:
            if f.suffix == ".parquet":
                pq.read_table(f)
            elif f.suffix == ".arrow":
                with pa.memory_map(str(f)) as src:
                    pa.ipc.open_stream(src).read_all()
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception:  # noqa: BLE001  (any failure names the file)
            return f
    return None


def read_pair_dataset(path: str | Path, split: str, negative_text: str | None = None) -> list[ClipPair]:
    """Text->image CLIP rows of the pair builder's dataset (``save_to_disk`` folder or parquet files).

    ``path`` may be the builder's OUT folder (its ``clip_t2i`` config; the healthy text then comes from
    the ``clip_i2t`` rows of the same file) or a dataset folder. Columns (names from
    :mod:`negdpo.preference.pairs.schema`): ``prompt``, ``chosen`` (Image, real positive), ``rejected``
    (Image, counterfactual), optional ``mask``, ``negative_prompt``, ``modality``, ``split``, ``kind`` and
    cached ``ref_sims``. Generator rows (other ``kind``) and image->text rows (text ``chosen``) are skipped
    and counted. ``split`` ``val`` and ``validation`` are the same split.
    """
    import datasets

    path = Path(path)
    neg_by_file = _healthy_texts_from_i2t(schema.find_dataset(path, "clip_i2t") if path.is_dir() else None, split)
    if path.is_dir() and not any(path.glob("*.parquet")):
        path = schema.find_dataset(path, "clip_t2i") or path
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))
                                     and not (path / "dataset_dict.json").exists()):
        files = [str(path)] if path.suffix == ".parquet" else [str(p) for p in sorted(path.glob("*.parquet"))]
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    else:
        ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split)
    cols = set(ds.column_names)
    missing = {schema.PROMPT, schema.CHOSEN, schema.REJECTED} - cols
    if missing:
        raise PairDataError(f"{path}: CLIP pair dataset lacks column(s) {sorted(missing)}")
    skipped = {"other kind": 0, "image->text": 0, "split": 0}
    pairs = []
    for i, row in _rows(ds):
        if schema.KIND in cols and not any(str(row[schema.KIND]).lower().startswith(k) for k in CLIP_KINDS):
            skipped["other kind"] += 1
            continue
        if schema.SPLIT in cols and not split_matches(row[schema.SPLIT], split):
            skipped["split"] += 1
            continue
        if isinstance(row[schema.CHOSEN], str):
            skipped["image->text"] += 1
            continue
        mod = row.get(schema.MODALITY) or ""
        neg = (row.get(schema.NEGATIVE_PROMPT) or neg_by_file.get(row.get(schema.FILE) or "") or negative_text
               or default_healthy_text(mod))
        mask = np.asarray(row[schema.MASK].convert("L")) > 0 if row.get(schema.MASK) is not None else None
        try:
            pairs.append(ClipPair(pair_id=str(row.get(schema.PAIR_ID, i)),
                                  positive=np.asarray(row[schema.CHOSEN].convert("RGB")),
                                  negative=np.asarray(row[schema.REJECTED].convert("RGB")),
                                  text_pos=row[schema.PROMPT], text_neg=neg, mask=mask,
                                  ref_sims=row.get(schema.REF_SIMS)))
        except Exception as err:
            err.negdpo_row = row.get(schema.PAIR_ID, i)  # named by pairs_from_dataset
            raise
    logger.info("%s: %d CLIP pairs for split %s; skipped %s", path, len(pairs), split, skipped)
    if not pairs:
        raise PairDataError(f"{path}: no text->image CLIP rows for split '{split}' (skipped: {skipped})")
    return pairs


def _rows(ds):
    """(index, row) of a dataset; a row that fails to decode carries its index on the error."""
    it = iter(ds)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as err:
            err.negdpo_row = i
            raise
        yield i, row
        i += 1


def _pick_split(dsd, split: str):
    """The split of a DatasetDict (``val`` = ``validation``; ``clip`` for older single-split files),
    else all splits concatenated (rows are then filtered by their ``split`` column)."""
    import datasets

    if "clip" in dsd:
        return dsd["clip"]
    for name in dsd:
        if split_matches(name, split):
            return dsd[name]
    return datasets.concatenate_datasets(list(dsd.values()))


def _healthy_texts_from_i2t(path: Path | None, split: str) -> dict[str, str]:
    """{source file: healthy text} from the builder's image->text rows of real positives."""
    if path is None or not path.is_dir():
        return {}
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split)
    cols = [c for c in (schema.FILE, schema.REJECTED, schema.IMAGE_IS_REAL) if c in ds.column_names]
    if len(cols) < 3:
        return {}
    rows = ds.select_columns(cols)
    return {r[schema.FILE]: r[schema.REJECTED] for r in rows if r[schema.IMAGE_IS_REAL]}


def load_pairs(data: str | Path, split: str, negative_text: str | None = None,
               reading: dict | None = None) -> list[ClipPair]:
    """A scan folder with twins (``*_twins/``) or a pair dataset folder (``val`` = ``validation``);
    ``reading``: how the folder's scans are read (``ScanReading.reading``)."""
    data = Path(data)
    folder_split = next((s for s in (split, "val" if split_matches(split, "val") else None)
                         if s and (data / f"{s}_images").is_dir()), None)
    if folder_split is not None:
        return pairs_from_scans(data, folder_split, negative_text, reading)
    return pairs_from_dataset(data, split, negative_text)


def _pil(image: np.ndarray) -> Image.Image:
    arr = image if image.dtype == np.uint8 and image.ndim == 3 else to_rgb_uint8(image)
    return Image.fromarray(arr)


def patch_mask(mask: np.ndarray | None, grid: tuple[int, int]) -> torch.Tensor:
    """Lesion fraction per patch after a centre square crop (the shortest-side resize + centre crop of
    open_clip's preprocess): (gh*gw,) float."""
    if mask is None:
        return torch.zeros(grid[0] * grid[1])
    h, w = mask.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    m = torch.from_numpy(np.ascontiguousarray(mask[top:top + s, left:left + s])).float()[None, None]
    return F.adaptive_avg_pool2d(m, grid).flatten()


class ClipPairDataset(torch.utils.data.Dataset):
    """Tensors for ``ClipPair`` rows through the model's ``preprocess`` (cached in memory by default)."""

    def __init__(self, pairs: Sequence[ClipPair], preprocess: Callable, grid: tuple[int, int],
                 cache: bool = True) -> None:
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.grid = grid
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        p = self.pairs[i]
        item = {"index": i, "pos": self.preprocess(_pil(p.positive)), "neg": self.preprocess(_pil(p.negative)),
                "text_pos": p.text_pos, "text_neg": p.text_neg, "patch_mask": patch_mask(p.mask, self.grid),
                "ref_sims": torch.tensor(p.ref_sims, dtype=torch.float32).view(2, 2) if p.ref_sims else None}
        if self._cache is not None:
            self._cache[i] = item
        return item

    def set_ref_sims(self, sims: torch.Tensor) -> None:
        """Store cached reference similarities (N, 2, 2) on the pairs (and drop stale cached items)."""
        for p, s in zip(self.pairs, sims.float().cpu()):
            p.ref_sims = s.flatten().tolist()
        if self._cache is not None:
            for i, item in self._cache.items():
                item["ref_sims"] = torch.tensor(self.pairs[i].ref_sims).view(2, 2)


def make_collate(tokenizer: Callable) -> Callable[[list[dict]], dict]:
    def collate(items: list[dict]) -> dict:
        texts = [t for it in items for t in (it["text_pos"], it["text_neg"])]
        batch = {
            "index": torch.tensor([it["index"] for it in items]),
            "pos": torch.stack([it["pos"] for it in items]),
            "neg": torch.stack([it["neg"] for it in items]),
            "texts": tokenizer(texts),  # (2B, ctx): pos, neg interleaved
            "patch_mask": torch.stack([it["patch_mask"] for it in items]),
        }
        if all(it["ref_sims"] is not None for it in items):
            batch["ref_sims"] = torch.stack([it["ref_sims"] for it in items])
        return batch

    return collate


def pairs_to_dataset(pairs: Sequence[ClipPair]):
    """HF ``Dataset`` of text->image rows with TRL names and the cached reference columns."""
    import datasets

    ref_chosen, ref_rejected = "ref_chosen_logps", "ref_rejected_logps"
    names = (schema.PAIR_ID, schema.PROMPT, schema.NEGATIVE_PROMPT, schema.CHOSEN, schema.REJECTED, schema.KIND,
             ref_chosen, ref_rejected, schema.REF_SIMS)
    rows: dict[str, list] = {n: [] for n in names}
    for p in pairs:
        s = p.ref_sims
        for name, value in zip(names, (p.pair_id, p.text_pos, p.text_neg, _pil(p.positive), _pil(p.negative),
                                       schema.KIND_T2I, s[0] if s else None,  # s_ref(x+, y+)
                                       s[2] if s else None, s)):  # s_ref(x-, y+)
            rows[name].append(value)
    text, score = datasets.Value("string"), datasets.Value("float32")
    features = datasets.Features({
        schema.PAIR_ID: text, schema.PROMPT: text, schema.NEGATIVE_PROMPT: text, schema.CHOSEN: datasets.Image(),
        schema.REJECTED: datasets.Image(), schema.KIND: text, ref_chosen: score, ref_rejected: score,
        schema.REF_SIMS: datasets.Sequence(score)})
    return datasets.Dataset.from_dict(rows, features=features)
