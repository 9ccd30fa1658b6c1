"""Generate -> judge -> write preference pairs: sharded, resumable, world-size independent.

The output folder is a Hub-style dataset repo (layout in :mod:`negdpo.preference.pairs.schema`, card in
:mod:`negdpo.preference.pairs.card`), plus ``OUT/build_summary.json`` and the QC report ``OUT/report/``.
The steps live in their own modules: listing (``items``), generation (``generate``), judging into rows
(``rows``), shards and merge (``shards``), card and settings (``card``); this module runs them.

Work unit = one *item* = one scan. Pair ids are ``<key>#gen:<source>``, ``<key>#t2i:<source>``,
``<key>#i2t:real`` and ``<key>#i2t:<source>``. Items are grouped (``batch_items`` per generator call)
*before* the groups are split over processes, so every group sees the same batch whatever the world
size, and the data are identical for 1 or N processes. Judges score the stored 8-bit rendering, so
scores do not move with float noise; on CPU, ``threads`` pins torch's intra-op threads for bit-identical
generation in every setting (an ``accelerate launch --cpu --num_processes 2`` build equals the
1-process build byte for byte).

Resume: "done" is "in a renamed shard" (see ``shards``), so a kill at any point neither loses nor
duplicates a pair. Unreadable inputs are reported and *not* marked done (a fixed file is picked up by
the next run), and neither are *failed* items (generation raised or gave too few finite candidates):
they are counted in the summary's ``failed`` and retried by the next run. The settings that shape the
rows are recorded; a rerun with other ones is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .card import check_settings, clear_output, record_settings, write_card
from .config import BuildConfig, row_settings, settings_sha
from .generate import CandidateGenerator, adapter_sha
from .items import Item, healthy_texts, list_items
from .rows import Outcome, RowMaker
from .schema import features_for, shard_dir
from .shards import chunk_index, drop_reasons, empty_dir, merge_shards, write_shard

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    pending: list[Item]
    skipped: list[tuple[str, str]]
    done: dict[str, set[str]]
    set_aside: list[str] = field(default_factory=list)


@dataclass
class WorkerResult:
    rank: int
    items: int = 0
    shards: list[str] = field(default_factory=list)
    rows: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  # item key -> reason (not marked done)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def split_evenly(seq: list, rank: int, world_size: int) -> list:
    """Contiguous share of ``seq`` for ``rank`` (the same split as accelerate's split_between_processes)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per, extra = divmod(len(seq), world_size)
    start = rank * per + min(rank, extra)
    return seq[start:start + per + (rank < extra)]


class Builder:
    """Holds the models; ``plan()`` lists the work, ``run_worker(rank, world)`` does one process's
    share, ``merge()`` turns the shards into the ``load_from_disk`` folders."""

    def __init__(self, cfg: BuildConfig, device: str | None = None) -> None:
        from negdpo.core.config import code_version, resolve_device

        from .judges import CompositeJudge

        cfg.validate()
        self.cfg = cfg
        self.kinds = cfg.kind_list()
        self.sources = cfg.source_list()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(device or cfg.device)
        self.root = Path(cfg.data)
        self.out = Path(cfg.out)
        self.code_version = code_version()
        self.healthy = healthy_texts(self.root, cfg.healthy_text)
        self.judge = CompositeJudge(cfg.judges, clip=cfg.clip, device=self.device)
        self._clip = None
        self.gen = CandidateGenerator(cfg, self.device, self.clip)
        self.rows = RowMaker(cfg, self.kinds, self.judge, self.gen, self.code_version)
        self.settings = row_settings(cfg, self.gen.adapter_sha)

    def use_config(self, cfg: BuildConfig) -> Builder:
        """Switch to another config that keeps the loaded models (same generator, adapter, judges, CLIP)."""
        same = ("generator", "adapter", "judges", "clip", "dtype", "data", "healthy_text")
        changed = [f"--{k}" for k in same if getattr(cfg, k) != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"use_config keeps the loaded models; build a new Builder to change {changed}")
        cfg.validate()
        self.cfg = self.gen.cfg = cfg
        self.kinds, self.sources = cfg.kind_list(), cfg.source_list()
        self.rows = RowMaker(cfg, self.kinds, self.judge, self.gen, self.code_version)
        self.settings = row_settings(cfg, self.gen.adapter_sha)
        return self.use_out(cfg.out)

    def use_out(self, out: str | Path) -> Builder:
        """Point this builder (and its loaded models) at another output folder."""
        self.out = Path(out)
        self.cfg.out = str(out)
        return self

    @property
    def pipe(self):
        return self.gen.pipe

    @pipe.setter
    def pipe(self, pipe) -> None:
        self.gen.pipe = pipe

    def clip(self) -> tuple:
        """(model, tokenizer) of the CLIP judge, or of ``cfg.clip`` when the judge has none."""
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
        return self.gen.gen_model(source)

    # -- planning -----------------------------------------------------------------------------
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

        Refuses an output built with other row settings. Corrupt shards are set aside (their items
        are pending again). Every process must work from the same plan: list, then
        ``wait_for_everyone`` before any process writes (``run_build`` does).
        """
        items, skipped = list_items(self.cfg)
        index = {kind: chunk_index(self.out, kind) for kind in self.kinds}
        shas = {m.get("settings_sha") for idx in index.values() for m in idx.metas}
        check_settings(self.out, self.settings, {s for s in shas if s})
        done = {kind: idx.items for kind, idx in index.items()}
        pending = [it for it in items if any(it.key not in done[k] for k in self.kinds)]
        return Plan(pending, skipped, done, [p for idx in index.values() for p in idx.set_aside])

    # -- one process's share ------------------------------------------------------------------
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
        if chunks:
            record_settings(self.out, self.settings)
        bar = tqdm(total=sum(len(g) for g in my_groups), desc=f"build-pairs [{rank}/{world_size}]", unit="scan",
                   position=rank, disable=not cfg.progress, dynamic_ncols=True)
        for ci, chunk in enumerate(chunks):
            if max_chunks is not None and ci >= max_chunks:
                break
            results: dict[str, Outcome | None] = {}
            for group in chunk:
                results.update(self.process_group(group, res))
                bar.update(len(group))
            t0 = time.perf_counter()
            self._write_chunk(chunk[0][0].split, results, plan.done, rank, res)
            res.seconds["write"] += time.perf_counter() - t0
            res.items += sum(len(g) for g in chunk)
        bar.close()
        return res

    def process_group(self, items: list[Item], res: WorkerResult) -> dict[str, Outcome | None]:
        """Outcome per item key (None = unreadable input, reported in ``res.skipped``)."""
        from negdpo.core.scans import ScanFolder

        from .judges import JudgeItem

        cfg = self.cfg
        from negdpo.core.window import reading_options

        folder = ScanFolder(self.root, on_error="skip", **reading_options(cfg))
        scans, ok_items, out = [], [], {}
        t0 = time.perf_counter()
        for it in items:
            scan = folder.load(Path(it.image_path), Path(it.mask_path) if it.mask_path else None, it.folder_split)
            if scan is None:
                res.skipped.extend(folder.skipped[-1:])
                out[it.key] = None
            elif not scan.positive:
                out[it.key] = Outcome(dropped="not_positive")
            else:
                scans.append(scan)
                ok_items.append(it)
        res.seconds["read"] += time.perf_counter() - t0
        if not scans:
            return out
        masks = [ndimage.binary_dilation(s.mask, iterations=cfg.dilate) if cfg.dilate > 0 else s.mask for s in scans]
        lesion_texts = [s.prompt or "A medical scan with a tumour." for s in scans]
        healthy = [self.healthy[it.modality] for it in ok_items]
        prompts = lesion_texts if cfg.gen_prompt == "source" else healthy
        keys = [it.key for it in ok_items]
        cands: dict[str, list[list[np.ndarray]]] = {}
        for source in self.sources:
            t0 = time.perf_counter()
            try:
                cands[source] = self.gen.candidates(source, [s.image for s in scans], masks, prompts, keys,
                                                    lesion_texts, healthy)
            except Exception:  # a failed generation fails these items (retried by the next run)
                logger.exception("generation failed for %s (%s)", keys, source)
                cands[source] = [[] for _ in scans]
            res.seconds[f"generate:{source}"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, (scan, it) in enumerate(zip(scans, ok_items)):
            jitem = JudgeItem(scan.image, masks[i], lesion_texts[i], healthy[i], scan.twin)
            out[it.key] = self.rows.rows_for(it, scan, masks[i], prompts[i], lesion_texts[i], healthy[i],
                                             {s: cands[s][i] for s in self.sources}, jitem, res.dropped)
        res.seconds["judge+pairs"] += time.perf_counter() - t0
        return out

    def _write_chunk(self, split: str, results: dict[str, Outcome | None], done: dict[str, set[str]], rank: int,
                     res: WorkerResult) -> None:
        for key, o in results.items():
            if o is not None and o.failed:
                res.failed[key] = o.failed
        finished = {k: o for k, o in results.items() if o is not None and not o.failed}
        for kind in self.kinds:
            keys = sorted(k for k in finished if k not in done[kind])
            if not keys:
                continue
            rows = sorted((r for k in keys for r in finished[k].rows.get(kind, [])), key=lambda r: r["pair_id"])
            dropped = {k: finished[k].dropped for k in keys if finished[k].dropped}
            name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
            path = Path(shard_dir(self.out, kind)) / f"{split}-{name}.parquet"
            feats = features_for(kind, self.rows.float_shape if self.cfg.store_arrays else None)
            meta = {"items": keys, "dropped": dropped, "rows": len(rows), "code_version": self.code_version,
                    "settings_sha": settings_sha(self.settings)}
            write_shard(path, rows, feats, meta, f"{rank}-{os.getpid()}", empty_dir(self.out, kind) / f"{split}-{name}.json")
            res.shards.append(str(path))
            res.rows[kind] += len(rows)
            if kind == self.kinds[0]:
                for reason, n in drop_reasons([{"dropped": dropped}]).items():
                    res.dropped[reason] += n

    def merge(self) -> dict[str, dict[str, int]]:
        """Every kind's shards -> ``OUT/<kind>`` (DatasetDict by split, sorted by pair_id)."""
        return merge_shards(self.out, self.kinds)


def check_process_group(num_processes: int, world_size: int | None = None) -> None:
    """Refuse N independent builds started by a launcher whose processes form no group (one folder, N writers)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if world_size is None else world_size
    if world > 1 and num_processes == 1:
        raise ValueError(f"the launcher started {world} processes but they form no process group, so each would run "
                         "the whole build into one folder; launch one process, or give --device cpu (CPU) / use GPUs")


def cpu_only(device: str) -> bool:
    """Whether the build's processes run on the CPU (then they group over gloo, not NCCL)."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def check_inputs(cfg: BuildConfig) -> None:
    """The generator, its adapter and (when a CLIP judge or boundary source uses it) the CLIP model are
    resolvable: checked before the output folder is claimed, a model loads or a scan is read, so a wrong path
    is one error, not one failure per scan."""
    from negdpo.core.models import ModelNotAvailableError, resolve_clip
    from negdpo.generator.sample import check_generator

    from .judges import parse_spec

    check_generator(cfg.generator, cfg.adapter)
    if any(name.startswith("clip") for name in parse_spec(cfg.judges)) or "boundary" in cfg.source_list():
        try:
            resolve_clip(cfg.clip)
        except ModelNotAvailableError as err:
            raise ModelNotAvailableError(f"--clip: {err}") from err


def run_build(cfg: BuildConfig, push_to_hub: str | None = None, report: bool = True,
              overwrite_output_dir: bool = False) -> dict:
    """Full build under Accelerate (any number of processes); returns the summary (main process).

    The main process holds the output folder's lock (``.negdpo.lock``, as the trainers do) for the whole
    build, so a second build into the same folder is refused. The summary's ``failed`` lists the scans
    whose generation failed (not done; rerun to retry).
    """
    import contextlib

    from accelerate import PartialState
    from negdpo.core.outdir import OutputDirError, read_marker, run_lock

    cfg.validate()
    check_inputs(cfg)
    owner = (read_marker(cfg.out) or {}).get("owner")
    if owner and owner != "build-pairs" and not overwrite_output_dir:  # core.outdir's rule for a foreign folder
        raise OutputDirError(f"{cfg.out}: holds the output of `negdpo {owner}`; choose an empty folder or add "
                             "--overwrite_output_dir to build beside it (its files are kept)")
    if not overwrite_output_dir:  # fail fast, before any model loads (plan() also checks the shards)
        check_settings(cfg.out, row_settings(cfg, adapter_sha(cfg.adapter)), set())
    state = PartialState(cpu=cpu_only(cfg.device))
    check_process_group(state.num_processes)
    with run_lock(cfg.out) if state.is_main_process else contextlib.nullcontext():
        try:
            return _build(cfg, state, push_to_hub, report, overwrite_output_dir)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cfg.out)) from err
            raise


def _build(cfg: BuildConfig, state, push_to_hub: str | None, report: bool, overwrite_output_dir: bool) -> dict:
    from accelerate.utils import gather_object

    device = str(state.device) if cfg.device == "auto" else cfg.device
    t0 = time.perf_counter()
    builder = Builder(cfg, device=device)
    if overwrite_output_dir and state.is_main_process:
        removed = clear_output(cfg.out)
        if removed:
            logger.info("--overwrite_output_dir: removed %s from %s", removed, cfg.out)
    state.wait_for_everyone()
    plan = builder.plan()
    state.wait_for_everyone()  # every rank has listed before anyone writes
    with state.split_between_processes(builder.groups(plan.pending)) as mine:
        res = builder.run_worker(state.process_index, state.num_processes, plan=plan, my_groups=list(mine))
    state.wait_for_everyone()
    results = gather_object([res]) if state.num_processes > 1 else [res]
    if not state.is_main_process:
        return {}
    counts = builder.merge()
    secs: Counter = Counter()
    for r in results:
        secs.update(dict(r.seconds))
    failed = {k: why for r in results for k, why in r.failed.items()}
    metas = chunk_index(cfg.out, builder.kinds[0]).metas
    elapsed = time.perf_counter() - t0
    summary = {
        "config": asdict(cfg), "settings": builder.settings, "world_size": state.num_processes,
        "code_version": builder.code_version, "rows": counts,
        "rows_this_run": dict(sum((r.rows for r in results), Counter())),
        "items_this_run": sum(r.items for r in results), "pending_at_start": len(plan.pending),
        "dropped": drop_reasons(metas), "dropped_this_run": dict(sum((r.dropped for r in results), Counter())),
        "failed": [{"item": k, "reason": why} for k, why in sorted(failed.items())],
        "set_aside": plan.set_aside,
        "skipped_files": [{"file": f, "reason": why} for r in results for f, why in r.skipped],
        "seconds": {"total": round(elapsed, 3), **{k: round(v, 3) for k, v in secs.items()}},
        "judge": builder.judge.spec, "gen_models": {s: builder.gen_model(s) for s in builder.sources},
    }
    if summary["items_this_run"]:
        summary["scans_per_s"] = round(summary["items_this_run"] / elapsed, 3)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".build_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out / "build_summary.json")
    write_card(out, builder.settings, counts, builder.judge.spec, summary["gen_models"], summary["dropped"])
    if report:
        from .report import write_report

        summary["report"] = str(write_report(cfg.out))
    if push_to_hub:
        from huggingface_hub import HfApi

        HfApi().create_repo(push_to_hub, repo_type="dataset", private=True, exist_ok=True)
        HfApi().upload_folder(repo_id=push_to_hub, repo_type="dataset", folder_path=str(out),
                              allow_patterns=["README.md", "data/**/*.parquet", "build_summary.json"])
    return summary
