"""Generate -> judge -> preference pairs, sharded, resumable and world-size independent.

Output layout (``OUT``)::

    OUT/data/<split>-<hash>.parquet              generator pairs, one shard per process per chunk
    OUT/dataset/                                 generator pairs: DatasetDict by split (save_to_disk)
    OUT/clip_t2i/{data,dataset}                  CLIP text->image pairs (same columns as generator)
    OUT/clip_i2t/{data,dataset}                  CLIP image->text pairs (image + chosen/rejected text)
    OUT/build_summary.json                       config, counts, dropped (by reason), skipped files
    OUT/report/                                  quality report (negdpo.preference.pairs.report)

Work unit = one *item* = one scan (image + mask) keyed ``<folder split>/<stem>``. Pair ids are
``<key>#gen:<source>``, ``<key>#t2i:<source>``, ``<key>#i2t:real`` and ``<key>#i2t:<source>``;
candidate j of a source has seed ``derive_seed(key, source, j, base=seed)``. Items are grouped
(``batch_items`` per generator call) *before* the groups are split over processes, so every group
sees the same batch whatever the world size, and the data are identical for 1 or N processes.
Judges score the stored 8-bit rendering (float64 numpy where they reduce), so scores do not move
with float noise; on CPU, ``threads`` pins torch's intra-op threads (accelerate's CPU launcher
gives each of N processes cores/N) for bit-identical generation in every setting. Checked: an
``accelerate launch --cpu --num_processes 2`` build equals the 1-process build byte for byte.

A shard is written to ``.<name>.tmp-<rank>-<pid>`` and renamed into place; its parquet schema
metadata (``negdpo``) lists the items it completed and the items it dropped (with the reason), so
"done" is exactly "in a renamed shard": a rerun skips those items, redoes the rest, and a kill
at any point neither loses nor duplicates a pair. Unreadable inputs are reported and *not* marked
done (a fixed file is picked up by the next run). Splits are the folder's, checked to be
subject-level (``meta.csv`` or ``subject_pattern`` gives the subject); ``resplit`` reassigns by a
hash of the subject instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .schema import KINDS, dataset_dir, difficulty_of, features_for, shard_dir

logger = logging.getLogger(__name__)
META_KEY = b"negdpo"
SOURCES = ("inpaint", "boundary")
I2T_QUESTION = "Which description matches this image?"


@dataclass
class BuildConfig:
    data: str
    out: str
    generator: str = "tiny"
    adapter: str | None = None
    k: int = 4  # candidates per positive and source
    steps: int = 20
    guidance: float = 1.0
    strength: float = 1.0
    scheduler: str | None = None
    size: int | None = None  # model resolution (default: the generator's native)
    dilate: int = 2  # px added to the lesion mask before repainting (stored as `mask`)
    seed: int = 0
    judges: str = "clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"
    clip: str = "tiny"
    sources: str = "inpaint"  # comma list of: inpaint, boundary
    rejected: str = "worst"  # worst fill | the positive itself
    kinds: str = "generator,clip_t2i,clip_i2t"
    gen_prompt: str = "source"  # conditioning text: the scan's prompt | the healthy text
    healthy_text: str | None = None  # default: from prompts of healthy scans per modality
    splits: str | None = None  # comma list; default all present
    limit: int | None = None  # at most this many scans per split (smoke runs)
    chunk_size: int = 16  # items per shard
    batch_items: int = 1  # items per generator call
    tie_eps: float = 1e-4
    store_arrays: bool = False
    subject_pattern: str | None = None  # regex on the file stem; group 1 = subject id
    resplit: bool = False
    boundary_steps: int = 20
    boundary_eps: float = 0.5
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads per process (pin it for CPU bit-reproducibility)
    progress: bool = True

    def kind_list(self) -> list[str]:
        return _choices(self.kinds, KINDS, "--kinds")

    def source_list(self) -> list[str]:
        return _choices(self.sources, SOURCES, "--sources")


def _choices(value: str, allowed: Iterable[str], flag: str) -> list[str]:
    """Comma list -> items, each one of ``allowed`` (at least one)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = sorted(set(items) - set(allowed))
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad}; choose from {tuple(allowed)}")
    return items


@dataclass(frozen=True)
class Item:
    key: str  # <folder split>/<stem>
    split: str  # assigned (subject-level) split
    file: str  # image path relative to the data root
    image_path: str
    mask_path: str | None
    folder_split: str
    subject_id: str
    modality: str


@dataclass
class Plan:
    pending: list[Item]
    skipped: list[tuple[str, str]]
    done: dict[str, set[str]]


@dataclass
class WorkerResult:
    rank: int
    items: int = 0
    shards: list[str] = field(default_factory=list)
    rows: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


# -- listing & splits ------------------------------------------------------------------------------
def _meta(root: Path) -> dict[str, dict]:
    path = root / "meta.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def _hash_split(subject: str) -> str:
    u = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < 0.6 else ("val" if u < 0.8 else "test")


def list_items(cfg: BuildConfig) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items sorted by (split, key) plus listing-time skips (missing masks). Checks subject-level splits."""
    from negdpo.core.imageio import stem_of
    from negdpo.core.scans import ScanFolder

    root = Path(cfg.data)
    folder = ScanFolder(root, on_error="skip")
    meta = _meta(root)
    pattern = re.compile(cfg.subject_pattern) if cfg.subject_pattern else None
    wanted = [s.strip() for s in cfg.splits.split(",")] if cfg.splits else folder.splits()
    items: list[Item] = []
    for split in wanted:
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
                    raise ValueError(f"{img}: --subject-pattern '{cfg.subject_pattern}' does not match '{stem}'")
                subject = m.group(1) if m.groups() else m.group(0)
            items.append(Item(key=f"{split}/{stem}", split=_hash_split(subject) if cfg.resplit else split,
                              file=str(img.relative_to(root)), image_path=str(img),
                              mask_path=str(mask) if mask else None, folder_split=split, subject_id=subject,
                              modality=row.get("modality") or "unknown"))
    check_subject_splits(items)
    items.sort(key=lambda it: (it.split, it.key))
    return items, list(folder.skipped)


def check_subject_splits(items: Iterable[Item]) -> None:
    """Raise if a subject appears in more than one split (slice leakage)."""
    where: dict[str, set[str]] = defaultdict(set)
    for it in items:
        where[it.subject_id].add(it.split)
    leaks = {s: sorted(v) for s, v in where.items() if len(v) > 1}
    if leaks:
        some = ", ".join(f"{s}: {v}" for s, v in list(leaks.items())[:5])
        raise ValueError(f"{len(leaks)} subject(s) appear in several splits ({some}); fix the folder, "
                         "give --subject-pattern, or pass --resplit to assign splits by subject")


def healthy_texts(root: Path, default: str | None) -> dict[str, str]:
    """Per-modality healthy text: the most common prompt of healthy scans in meta.csv/prompts.json."""
    if default:
        return defaultdict(lambda: default)
    meta = _meta(root)
    prompts_path = root / "prompts.json"
    prompts = json.loads(prompts_path.read_text()) if prompts_path.is_file() else {}
    counts: dict[str, Counter] = defaultdict(Counter)
    for name, row in meta.items():
        if str(row.get("positive")) == "0" and name in prompts:
            counts[row.get("modality") or "unknown"][prompts[name]] += 1
    out: dict[str, str] = defaultdict(lambda: "A medical scan with no tumour.")
    out.update({mod: c.most_common(1)[0][0] for mod, c in counts.items()})
    return out


# -- shards ----------------------------------------------------------------------------------------
def shard_files(out: str | Path, kind: str) -> list[Path]:
    d = Path(shard_dir(str(out), kind))
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def shard_meta(path: Path) -> dict:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def empty_dir(out: str | Path, kind: str) -> Path:
    """Manifests of chunks that produced no rows (zero-row parquet files break ``load_dataset``)."""
    return Path(out) / ".empty_chunks" / kind


def chunk_metas(out: str | Path, kind: str) -> list[dict]:
    """Metadata of every finished chunk of a kind: the shards' plus the empty chunks' manifests."""
    metas = [shard_meta(p) for p in shard_files(out, kind)]
    d = empty_dir(out, kind)
    if d.is_dir():
        metas += [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    return metas


def done_items(out: str | Path, kinds: list[str]) -> dict[str, set[str]]:
    """Item keys finished per kind (from the renamed shards' metadata and the empty-chunk manifests)."""
    return {kind: {k for m in chunk_metas(out, kind) for k in m.get("items", [])} for kind in kinds}


def write_shard(path: Path, rows: list[dict], features, meta: dict, tag: str, empty_manifest: Path) -> None:
    """Atomic parquet write (tmp + rename) with the HF features and our metadata in the schema.

    A chunk without rows writes only its manifest (``empty_dir``), atomically as well.
    """
    import datasets
    import pyarrow.parquet as pq

    if not rows:
        empty_manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp = empty_manifest.with_name(f".{empty_manifest.name}.tmp-{tag}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, empty_manifest)
        return

    columns = {name: [r[name] for r in rows] for name in features}
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(meta).encode()
    table = table.replace_schema_metadata(md)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _png(arr: np.ndarray) -> dict:
    from negdpo.core.imageio import to_uint8

    u8 = to_uint8(arr) if arr.dtype != np.uint8 else arr
    buf = BytesIO()
    Image.fromarray(u8, "L" if u8.ndim == 2 else "RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _adapter_sha(adapter: str | None) -> str:
    if not adapter:
        return ""
    p = Path(adapter)
    f = p / "pytorch_lora_weights.safetensors" if p.is_dir() else p
    if not f.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# -- the builder -----------------------------------------------------------------------------------
class Builder:
    """Holds the models; ``run_worker(rank, world)`` does one process's share, ``merge()`` the rest."""

    def __init__(self, cfg: BuildConfig, device: str | None = None) -> None:
        from negdpo.core.config import code_version, resolve_device

        from .judges import CompositeJudge

        self.cfg = cfg
        self.kinds = cfg.kind_list()
        self.sources = cfg.source_list()
        if cfg.rejected not in ("worst", "positive"):
            raise ValueError(f"--rejected must be 'worst' or 'positive', got '{cfg.rejected}'")
        if cfg.rejected == "worst" and cfg.k < 2:
            raise ValueError("--k must be >= 2 with --rejected worst (or use --rejected positive)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(device or cfg.device)
        self.root = Path(cfg.data)
        self.out = Path(cfg.out)
        self.code_version = code_version()
        self.healthy = healthy_texts(self.root, cfg.healthy_text)
        self.judge = CompositeJudge(cfg.judges, clip=cfg.clip, device=self.device)
        self._pipe = None
        self._boundary = None
        self._clip = None
        self.adapter_sha = _adapter_sha(cfg.adapter)
        self.float_shape: tuple[int, int] | None = None

    def use_out(self, out: str | Path) -> Builder:
        """Point this builder (and its loaded models) at another output folder."""
        self.out = Path(out)
        self.cfg.out = str(out)
        return self

    # models are loaded lazily (a rerun with nothing left to do loads nothing)
    @property
    def pipe(self):
        if self._pipe is None:
            from negdpo.generator.sample import load_generator

            self._pipe = load_generator(self.cfg.generator, self.cfg.adapter, device=self.device,
                                        dtype=getattr(torch, self.cfg.dtype))
        return self._pipe

    def clip(self):
        if self._clip is None:
            j = self.judge.judges.get("clip_lesion")
            if j is not None:
                self._clip = (j.model, j.tokenizer)
            else:
                from negdpo.core.models import load_clip

                m, _, tok = load_clip(self.cfg.clip, device=self.device)
                self._clip = (m, tok)
        return self._clip

    def gen_model(self, source: str) -> str:
        if source == "inpaint":
            return self.cfg.generator
        return f"latent_boundary:{self.cfg.generator}-vae:clip-{self.cfg.clip}"

    # -- generation ---------------------------------------------------------------------------
    def _candidates(self, source: str, scans: list, masks: list[np.ndarray], prompts: list[str],
                    keys: list[str]) -> list[list[np.ndarray]]:
        from negdpo.core.config import derive_seed

        k = self.cfg.k
        seeds = [derive_seed(key, source, j, base=self.cfg.seed) for key in keys for j in range(k)]
        images = [s.image for s in scans for _ in range(k)]
        mm = [m for m in masks for _ in range(k)]
        pp = [p for p in prompts for _ in range(k)]
        if source == "inpaint":
            from negdpo.generator.sample import inpaint

            flat = inpaint(self.pipe, images, mm, pp, seeds, steps=self.cfg.steps,
                           guidance_scale=self.cfg.guidance, strength=self.cfg.strength,
                           scheduler=self.cfg.scheduler, size=self.cfg.size, batch_size=len(images))
        else:
            flat = self._boundary_candidates(images, mm, pp, seeds, scans, k)
        return [flat[i * k:(i + 1) * k] for i in range(len(scans))]

    def _boundary_candidates(self, images, masks, prompts, seeds, scans, k) -> list[np.ndarray]:
        import torch.nn.functional as F
        from negdpo.generator.sample import native_size

        from .boundary import BoundaryConfig, LatentBoundary, zero_shot_logit_fn

        if self._boundary is None:
            size = int(self.cfg.size or native_size(self.pipe))
            self._boundary = LatentBoundary(self.pipe.vae, size, BoundaryConfig(
                steps=self.cfg.boundary_steps, eps=self.cfg.boundary_eps))
        model, tok = self.clip()
        feats = []
        with torch.no_grad():
            for s in scans:
                t = tok([self.healthy[self._mod(s)], s.prompt or "tumour"]).to(self.device)
                feats += [F.normalize(model.encode_text(t), dim=-1)] * k
        with torch.enable_grad():
            return self._boundary(images, masks, seeds, zero_shot_logit_fn(model, torch.stack(feats)))

    def _mod(self, scan) -> str:
        return self._item_of[scan.name].modality

    # -- one group of items -------------------------------------------------------------------
    def process_group(self, items: list[Item], res: WorkerResult) -> dict[str, tuple[list[dict], str | None]]:
        """Rows per kind for each item: {key: ({kind: rows}, drop reason or None)}; None value = read error."""
        from negdpo.core.scans import ScanFolder

        from .judges import JudgeItem

        cfg = self.cfg
        folder = ScanFolder(self.root, on_error="skip")
        scans, ok_items, out = [], [], {}
        t0 = time.perf_counter()
        for it in items:
            scan = folder.load(Path(it.image_path), Path(it.mask_path) if it.mask_path else None, it.folder_split)
            if scan is None:
                res.skipped.extend(folder.skipped[-1:])
                out[it.key] = None
                continue
            if not scan.positive:
                out[it.key] = ({}, "not_positive")
                continue
            scans.append(scan)
            ok_items.append(it)
        res.seconds["read"] += time.perf_counter() - t0
        if not scans:
            return out
        self._item_of = {s.name: it for s, it in zip(scans, ok_items)}
        masks = [ndimage.binary_dilation(s.mask, iterations=cfg.dilate) if cfg.dilate > 0 else s.mask for s in scans]
        lesion_texts = [s.prompt or "A medical scan with a tumour." for s in scans]
        healthy = [self.healthy[it.modality] for it in ok_items]
        prompts = lesion_texts if cfg.gen_prompt == "source" else healthy
        cands: dict[str, list[list[np.ndarray]]] = {}
        for source in self.sources:
            t0 = time.perf_counter()
            try:
                cands[source] = self._candidates(source, scans, masks, prompts, [it.key for it in ok_items])
            except Exception as err:  # a failed generation drops these items, the run goes on
                logger.exception("generation failed for %s (%s)", [it.key for it in ok_items], source)
                cands[source] = [[] for _ in scans]
                res.dropped[f"failed_generation:{type(err).__name__}"] += len(scans)
            res.seconds[f"generate:{source}"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, (scan, it) in enumerate(zip(scans, ok_items)):
            jitem = JudgeItem(scan.image, masks[i], lesion_texts[i], healthy[i], scan.twin)
            out[it.key] = self._pairs_for(it, scan, masks[i], prompts[i], lesion_texts[i], healthy[i],
                                          {s: cands[s][i] for s in self.sources}, jitem, res)
        res.seconds["judge+pairs"] += time.perf_counter() - t0
        return out

    def _pairs_for(self, it: Item, scan, mask, gen_prompt, lesion_text, healthy_text, cands, jitem, res):
        from negdpo.core.config import derive_seed

        cfg = self.cfg
        rows: dict[str, list[dict]] = defaultdict(list)
        reasons = []
        store = cfg.store_arrays
        if store:
            if scan.image.ndim != 2:
                raise ValueError(f"{it.file}: --store-arrays supports grayscale scans only")
            if self.float_shape is None:
                self.float_shape = scan.image.shape
            if scan.image.shape != self.float_shape:
                raise ValueError(f"{it.file}: size {scan.image.shape} differs from {self.float_shape}; "
                                 "--store-arrays needs one size per build")
        base = {"subject_id": it.subject_id, "split": it.split, "modality": it.modality, "file": it.file,
                "code_version": self.code_version, "label_source": self.judge.spec}
        src_png, mask_png = _png(scan.image), _png(mask.astype(np.uint8) * 255)
        pos_score: float | None = None
        pos_parts: dict = {}
        for source, imgs in cands.items():
            seeds = [derive_seed(it.key, source, j, base=cfg.seed) for j in range(len(imgs))]
            valid = [(im, s) for im, s in zip(imgs, seeds) if im is not None and np.isfinite(im).all()]
            if len(valid) < len(imgs):
                res.dropped["failed_candidate"] += len(imgs) - len(valid)
            if not valid:
                reasons.append(f"failed_generation:{source}")
                continue
            scores, parts = self.judge(jitem, [v[0] for v in valid] + [scan.image])
            pos_score, pos_parts = float(scores[-1]), parts[-1]
            scores, parts = scores[:-1], parts[:-1]
            order = np.argsort(-scores, kind="stable")
            b = int(order[0])
            best, best_seed, sb = valid[b][0], valid[b][1], float(scores[b])
            prov = base | {
                "gen_model": self.gen_model(source), "gen_adapter_sha": self.adapter_sha if source == "inpaint" else "",
                "scheduler": (cfg.scheduler or type(self.pipe.scheduler).__name__) if source == "inpaint" else "adam",
                "steps": cfg.steps if source == "inpaint" else cfg.boundary_steps,
                "guidance": cfg.guidance if source == "inpaint" else 0.0,
                "strength": cfg.strength if source == "inpaint" else cfg.boundary_eps}
            if "generator" in self.kinds:
                if cfg.rejected == "worst":
                    w = int(order[-1])
                    rej, rej_seed, sr, rej_parts = valid[w][0], valid[w][1], float(scores[w]), parts[w]
                else:
                    rej, rej_seed, sr, rej_parts = scan.image, -1, pos_score, pos_parts
                if len(valid) < 2 and cfg.rejected == "worst":
                    reasons.append(f"too_few_candidates:{source}")
                elif sb - sr < cfg.tie_eps:
                    reasons.append(f"tie:{source}")
                else:
                    d, bucket = difficulty_of(sb - sr)
                    row = prov | {"pair_id": f"{it.key}#gen:{source}", "prompt": gen_prompt, "source": src_png,
                                  "mask": mask_png, "chosen": _png(best), "rejected": _png(rej),
                                  "score_chosen": sb, "score_rejected": sr, "difficulty": d,
                                  "difficulty_bucket": bucket, "judge_chosen": json.dumps(parts[b]),
                                  "judge_rejected": json.dumps(rej_parts), "seed_chosen": best_seed,
                                  "seed_rejected": rej_seed, "kind": "generator"}
                    if store:
                        row |= {"source_f32": scan.image, "chosen_f32": best, "rejected_f32": rej}
                    rows["generator"].append(row)
            # CLIP rows: lesion-ness = 1 - composite score; the real positive should win for its lesion text
            les_pos, les_neg = 1.0 - pos_score, 1.0 - sb
            if les_pos - les_neg < cfg.tie_eps:
                if "clip_t2i" in self.kinds or "clip_i2t" in self.kinds:
                    reasons.append(f"clip_not_separated:{source}")
                continue
            d, bucket = difficulty_of(les_pos - les_neg)
            if "clip_t2i" in self.kinds:
                row = prov | {"pair_id": f"{it.key}#t2i:{source}", "prompt": lesion_text, "source": src_png,
                              "mask": mask_png, "chosen": src_png, "rejected": _png(best),
                              "score_chosen": les_pos, "score_rejected": les_neg, "difficulty": d,
                              "difficulty_bucket": bucket, "judge_chosen": json.dumps(pos_parts),
                              "judge_rejected": json.dumps(parts[b]), "seed_chosen": -1,
                              "seed_rejected": best_seed, "kind": "clip_t2i"}
                if store:
                    row |= {"source_f32": scan.image, "chosen_f32": scan.image, "rejected_f32": best}
                rows["clip_t2i"].append(row)
            if "clip_i2t" in self.kinds:
                d2, b2 = difficulty_of(abs(2 * sb - 1))
                row = prov | {"pair_id": f"{it.key}#i2t:{source}", "image": _png(best), "mask": mask_png,
                              "prompt": I2T_QUESTION, "chosen": healthy_text, "rejected": lesion_text,
                              "score_chosen": sb, "score_rejected": 1.0 - sb, "difficulty": d2,
                              "difficulty_bucket": b2, "image_is_real": False, "seed_chosen": best_seed,
                              "seed_rejected": best_seed, "kind": "clip_i2t"}
                if store:
                    row["image_f32"] = best
                rows["clip_i2t"].append(row)
        if "clip_i2t" in self.kinds and pos_score is not None:
            d, bucket = difficulty_of(abs(1 - 2 * pos_score))
            row = base | {"pair_id": f"{it.key}#i2t:real", "image": src_png, "mask": mask_png,
                          "prompt": I2T_QUESTION, "chosen": lesion_text, "rejected": healthy_text,
                          "score_chosen": 1.0 - pos_score, "score_rejected": pos_score, "difficulty": d,
                          "difficulty_bucket": bucket, "image_is_real": True, "gen_model": "real",
                          "gen_adapter_sha": "", "scheduler": "", "steps": 0, "guidance": 0.0, "strength": 0.0,
                          "seed_chosen": -1, "seed_rejected": -1, "kind": "clip_i2t"}
            if store:
                row["image_f32"] = scan.image
            rows["clip_i2t"].append(row)
        return dict(rows), (";".join(reasons) or None)

    # -- one process's share ------------------------------------------------------------------
    def groups(self, items: list[Item]) -> list[list[Item]]:
        """Consecutive items of one split, ``batch_items`` per group (independent of world size)."""
        out: list[list[Item]] = []
        for it in items:
            if out and len(out[-1]) < self.cfg.batch_items and out[-1][0].split == it.split:
                out[-1].append(it)
            else:
                out.append([it])
        return out

    def plan(self) -> Plan:
        """What is left to do: items not finished in every kind, listing-time skips, done sets.

        Every process must work from the same plan: list, then ``wait_for_everyone`` before any
        process writes (``run_build`` does), else a fast rank's shards would change a slow rank's
        listing and with it the split of the work.
        """
        items, skipped = list_items(self.cfg)
        done = done_items(self.out, self.kinds)
        pending = [it for it in items if any(it.key not in done[k] for k in self.kinds)]
        return Plan(pending, skipped, done)

    def run_worker(self, rank: int = 0, world_size: int = 1, plan: Plan | None = None,
                   my_groups: list[list[Item]] | None = None, max_chunks: int | None = None) -> WorkerResult:
        """Process rank's contiguous share of the plan's groups; one shard per kind per chunk.

        ``my_groups`` (from ``split_between_processes``) overrides the explicit (rank, world) split;
        ``max_chunks`` stops early (simulates a killed process).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        res = WorkerResult(rank=rank)
        plan = plan or self.plan()
        done = plan.done
        if rank == 0:
            res.skipped.extend(plan.skipped)
        if my_groups is None:
            my_groups = split_evenly(self.groups(plan.pending), rank, world_size)
        per_chunk = max(1, cfg.chunk_size // cfg.batch_items)
        chunks: list[list[list[Item]]] = []
        for g in my_groups:  # chunks never cross a split (shard names start with the split)
            if chunks and len(chunks[-1]) < per_chunk and chunks[-1][0][0].split == g[0].split:
                chunks[-1].append(g)
            else:
                chunks.append([g])
        n_items = sum(len(g) for g in my_groups)
        bar = tqdm(total=n_items, desc=f"build-pairs [{rank}/{world_size}]", unit="scan", position=rank,
                   disable=not cfg.progress, dynamic_ncols=True)
        for ci, chunk in enumerate(chunks):
            if max_chunks is not None and ci >= max_chunks:
                break
            results: dict[str, tuple | None] = {}
            for group in chunk:
                results.update(self.process_group(group, res))
                bar.update(len(group))
            t0 = time.perf_counter()
            self._write_chunk(chunk[0][0].split, results, done, rank, res)
            res.seconds["write"] += time.perf_counter() - t0
            res.items += sum(len(g) for g in chunk)
        bar.close()
        return res

    def _write_chunk(self, split: str, results: dict, done: dict[str, set[str]], rank: int,
                     res: WorkerResult) -> None:
        for kind in self.kinds:
            keys = sorted(k for k, v in results.items() if v is not None and k not in done[kind])
            if not keys:
                continue
            rows = [r for k in keys for r in results[k][0].get(kind, [])]
            rows.sort(key=lambda r: r["pair_id"])
            dropped = {k: results[k][1] for k in keys if results[k][1]}
            name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
            path = Path(shard_dir(str(self.out), kind)) / f"{split}-{name}.parquet"
            feats = features_for(kind, self.float_shape if self.cfg.store_arrays else None)
            write_shard(path, rows, feats, {"items": keys, "dropped": dropped, "rows": len(rows),
                                            "code_version": self.code_version}, f"{rank}-{os.getpid()}",
                        empty_dir(self.out, kind) / f"{split}-{name}.json")
            res.shards.append(str(path))
            res.rows[kind] += len(rows)
            if kind == self.kinds[0]:
                for reason in dropped.values():
                    for r in reason.split(";"):
                        res.dropped[r.split(":")[0]] += 1

    # -- merge --------------------------------------------------------------------------------
    def merge(self) -> dict[str, dict[str, int]]:
        """Every kind's shards -> DatasetDict by split, sorted by pair_id, saved with save_to_disk."""
        return merge_shards(self.out, self.kinds)


def split_evenly(seq: list, rank: int, world_size: int) -> list:
    """Contiguous share of ``seq`` for ``rank`` (the same split as accelerate's split_between_processes)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per, extra = divmod(len(seq), world_size)
    start = rank * per + min(rank, extra)
    return seq[start:start + per + (rank < extra)]


def merge_shards(out: str | Path, kinds: Iterable[str]) -> dict[str, dict[str, int]]:
    import datasets

    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for kind in kinds:
        files = shard_files(out, kind)
        for tmp in Path(shard_dir(str(out), kind)).glob(".*.tmp-*") if files else []:
            tmp.unlink(missing_ok=True)  # leftovers of killed writers
        by_split: dict[str, list[str]] = defaultdict(list)
        for f in files:
            by_split[f.name.split("-", 1)[0]].append(str(f))
        if not files:
            continue
        cache = out / ".hf_cache"
        dsd = datasets.load_dataset("parquet", data_files=dict(by_split), cache_dir=str(cache))
        dsd = datasets.DatasetDict({s: dsd[s].sort("pair_id") for s in sorted(dsd)})
        for s, ds in dsd.items():
            ids = ds["pair_id"]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"{kind}/{s}: duplicate pair_ids in the shards of {out}")
        final = Path(dataset_dir(str(out), kind))
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dsd.save_to_disk(str(tmp))
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        del dsd
        shutil.rmtree(cache, ignore_errors=True)
        counts[kind] = {s: len(d) for s, d in datasets.load_from_disk(str(final)).items()}
    return counts


def dropped_counts(out: str | Path, kinds: list[str]) -> dict[str, int]:
    """Drop reasons over all shards of the first kind (each item is in exactly one of its shards)."""
    c: Counter = Counter()
    for meta in chunk_metas(out, kinds[0]):
        for reason in meta.get("dropped", {}).values():
            for r in reason.split(";"):
                c[r.split(":")[0]] += 1
    return dict(c)


def run_build(cfg: BuildConfig, push_to_hub: str | None = None, report: bool = True) -> dict:
    """Full build under Accelerate (any number of processes); returns the summary (main process)."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    device = str(state.device) if cfg.device == "auto" else cfg.device
    t0 = time.perf_counter()
    builder = Builder(cfg, device=device)
    plan = builder.plan()
    pending = plan.pending
    state.wait_for_everyone()  # every rank has listed before anyone writes
    groups = builder.groups(pending)
    with state.split_between_processes(groups) as mine:
        res = builder.run_worker(state.process_index, state.num_processes, plan=plan, my_groups=list(mine))
    state.wait_for_everyone()
    from accelerate.utils import gather_object

    results = gather_object([res]) if state.num_processes > 1 else [res]
    if not state.is_main_process:
        return {}
    counts = builder.merge()
    elapsed = time.perf_counter() - t0
    secs: Counter = Counter()
    for r in results:
        secs.update(dict(r.seconds))
    skipped = [s for r in results for s in r.skipped]
    summary = {
        "config": asdict(cfg), "world_size": state.num_processes, "code_version": builder.code_version,
        "rows": counts, "rows_this_run": dict(sum((r.rows for r in results), Counter())),
        "items_this_run": sum(r.items for r in results), "pending_at_start": len(pending),
        "dropped": dropped_counts(cfg.out, builder.kinds), "dropped_this_run":
            dict(sum((r.dropped for r in results), Counter())),
        "skipped_files": [{"file": f, "reason": why} for f, why in skipped],
        "seconds": {"total": round(elapsed, 3), **{k: round(v, 3) for k, v in secs.items()}},
        "judge": builder.judge.spec, "gen_models": {s: builder.gen_model(s) for s in builder.sources},
    }
    if summary["items_this_run"]:
        summary["scans_per_s"] = round(summary["items_this_run"] / elapsed, 3)
    tmp = Path(cfg.out) / ".build_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(Path(cfg.out) / "build_summary.json")
    if report:
        from .report import write_report

        summary["report"] = str(write_report(cfg.out))
    if push_to_hub:
        import datasets

        for kind in builder.kinds:
            path = Path(dataset_dir(cfg.out, kind))
            if path.exists():
                datasets.load_from_disk(str(path)).push_to_hub(push_to_hub, config_name=kind, private=True)
    return summary
