"""Stage bookkeeping: every stage writes into ``work_dir/<stage>/`` and leaves a ``stage.json`` stamp holding
its settings, its result and the files it opened per split; a rerun skips stamped stages whose settings are
unchanged (training stages also resume from their last Accelerate checkpoint), so an interrupted study continues
where it stopped.

:class:`StudyRun` is what the stage functions share: the config, the folders, the device and the stage
runner (:meth:`StudyRun.stage`, :meth:`StudyRun.stages` for independent stages run in worker processes, and
:meth:`StudyRun.background` for stages that run on spare workers while this process goes on).

Split reads are counted per stage: a stage's ``stage.json`` keeps the files it opened per split itself and the
names of the stages it read, and :meth:`StudyRun.stage` counts a stage (and those) in the current phase once per
run, whether it ran here, ran in a worker or came from the cache. A study rendered from its cache therefore
reports the same reads as the run that computed it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negdpo.core.console import setup_logging
from negdpo.core.split_lock import active_lock, locked_splits

logger = logging.getLogger("negdpo.study")

StageFn = Callable[[Path], dict]
Job = tuple[str, dict, StageFn]


def stamp_key(settings: dict) -> str:
    """The cache key of a stage's settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamp_of(work: Path, stage: str) -> str | None:
    """The cache key of a finished study stage (its ``stage.json``), None if it has not run."""
    stamp = work / stage / "stage.json"
    return json.loads(stamp.read_text())["key"] if stamp.exists() else None


def cached_result(work: Path, name: str, settings: dict) -> dict | None:
    """The stage's stored result if ``stage.json`` says it ran with these settings, else None."""
    stamp = work / name / "stage.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == stamp_key(settings):
            return info["result"]
    return None


_running = threading.local()  # per thread: the stages read by each stage now running (innermost last)


def run_stage(work: Path, name: str, settings: dict, fn: StageFn) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage.json`` says it already ran with the same settings. ``stage.json`` keeps
    the files ``fn`` opened per split itself (``reads``; not counted in the caller's lock record) and the stages it
    read (``stages``); :meth:`StudyRun.stage` counts them from there."""
    running = _running.__dict__.setdefault("stack", [])
    if running:
        running[-1].append(name)  # the stage running here reads this one
    stage_dir = work / name
    stamp = stage_dir / "stage.json"
    cached = cached_result(work, name, settings)
    if cached is not None:
        logger.info("stage %s: cached", name)
        return cached
    if stamp.exists():
        logger.info("stage %s: settings changed, rerunning from scratch", name)
        shutil.rmtree(stage_dir)  # never resume another setting's checkpoints
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    running.append([])
    try:
        with locked_splits(()) as record:  # the enclosing lock holds; what the stage opens is counted for it alone
            result = fn(stage_dir)
    finally:
        read = running.pop()
    info = {"key": stamp_key(settings), "settings": settings, "result": result,
            "seconds": round(time.perf_counter() - t0, 1), "pid": os.getpid(), "reads": dict(record.reads),
            "stages": list(dict.fromkeys(read))}
    tmp = stamp.with_name(".stage.json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(stamp)
    print(f"[study] {name}: done in {info['seconds']:.0f}s", flush=True)
    return result


def json_rows(rows: list[dict], name: str | None = None) -> list[dict]:
    """Rows as plain JSON (NaN -> float kept by ``default=float``), the checkpoint renamed to ``name``."""
    out = json.loads(json.dumps(rows, default=float))
    if name is not None:
        for r in out:
            r["checkpoint"] = name
    return out


# -- independent stages in worker processes ---------------------------------------------------------------------
def _init_worker(threads: int) -> None:
    import torch

    setup_logging()
    if threads > 0:
        torch.set_num_threads(threads)


def _run_in_worker(work: Path, name: str, settings: dict, fn: StageFn, locked: frozenset[str]) -> None:
    """One stage in a worker; its reads are counted where the parent reads its stamp (:meth:`StudyRun.stage`)."""
    with locked_splits(locked):  # the parent's locked splits stay locked in the worker
        run_stage(work, name, settings, fn)


def prefetch_parallel(work: Path, jobs: list[Job], workers: int, threads: int) -> list[str]:
    """Run the uncached ``(name, settings, fn)`` stages in ``workers`` spawned processes; names run there.

    ``settings`` are the full stamp settings (as :func:`run_stage` gets them) and every ``fn`` must pickle
    (a module-level function or a ``functools.partial`` of one). With fewer than two uncached stages, or
    ``workers`` <= 1, nothing runs here and the serial pass does the work. Each stage seeds itself and writes
    only its own folder, so ``workers`` changes the wall time only.
    """
    todo = [j for j in jobs if cached_result(work, j[0], j[1]) is None]
    if workers <= 1 or len(todo) < 2:
        return []
    with background_stages(work, todo, workers, threads, frozenset()) as started:
        pass  # nothing to do meanwhile: leaving the block waits for every stage
    return started


@contextmanager
def background_stages(work: Path, jobs: list[Job], workers: int, threads: int,
                      locked: frozenset[str]) -> Iterator[list[str]]:
    """Start the uncached ``jobs`` in ``workers`` spawned processes and return to the caller at once; leaving the
    block waits for them (a failed stage raises there).
    ``locked`` splits stay locked in the workers. With ``workers`` < 1 nothing starts: the stages run later, where
    the caller reads them. Yields the names started."""
    todo = [j for j in jobs if cached_result(work, j[0], j[1]) is None]
    if workers < 1 or not todo:
        yield []
        return
    logger.info("running %d stages in %d processes: %s", len(todo), workers, ", ".join(j[0] for j in todo))
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    futures = [pool.submit(_run_in_worker, work, *job, frozenset(locked) | active_lock()) for job in todo]
    try:
        yield [j[0] for j in todo]
        pool.shutdown(wait=True)  # every stage finishes (or fails) before the first failure is raised
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the block itself failed: drop the stages not yet started


@dataclass
class StudyRun:
    """One run of the study: its config (a :class:`negdpo.study.config.StudyConfig`), folders and stage runner."""

    cfg: Any
    work: Path
    out: Path
    device: str
    stage_seconds: dict[str, float] = field(default_factory=dict)  # as first computed (cached: the original time)
    phantoms: Path = Path()  # the phantom folder (set by the phantoms stage) and its stage settings
    ph_settings: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)  # how the learned generators sample: {init, strength}
    reads: dict[str, Counter] = field(default_factory=dict)  # {phase: {split: files opened}} (every stage read)
    counted: set[str] = field(default_factory=set)  # the stages whose reads are in ``reads``
    unrecorded: list[str] = field(default_factory=list)  # stages whose stamp predates the reads record
    current_phase: str | None = None  # where a stage read now is counted (None: outside every phase, not counted)

    def stamped(self, settings: dict) -> dict:
        return {"preset": self.cfg.preset, **settings}  # no stage is shared between presets

    def stage(self, name: str, settings: dict, fn: StageFn, count: bool = True) -> dict:
        """One cached stage (:func:`run_stage`); its seconds are recorded and its reads counted in the current
        phase (:meth:`count_reads`). ``count=False`` for a stage whose stages are read one by one afterwards."""
        result = run_stage(self.work, name, self.stamped(settings), fn)
        self.stage_seconds[name] = json.loads((self.work / name / "stage.json").read_text())["seconds"]
        if count:
            self.count_reads(name)
        return result

    def count_reads(self, name: str) -> None:
        """Add the files stage ``name`` opened per split, and those of the stages it read, to the current phase's
        ``reads``: each stage once per run, from its stamp, so a cached stage counts as the computing run did."""
        if self.current_phase is None or name in self.counted:
            return
        self.counted.add(name)
        info = json.loads((self.work / name / "stage.json").read_text())
        if "reads" not in info:
            self.unrecorded.append(name)
            return
        self.reads.setdefault(self.current_phase, Counter()).update(info["reads"])
        for inner in info.get("stages", []):
            self.count_reads(inner)

    def stages(self, jobs: list[Job]) -> list[dict]:
        """Independent stages: run in ``cfg.workers`` processes first (if > 1), then read in order."""
        prefetch_parallel(self.work, [(n, self.stamped(st), f) for n, st, f in jobs], self.cfg.workers,
                          self.cfg.threads)
        return [self.stage(*job) for job in jobs]

    def background(self, jobs: list[Job], locked: tuple[str, ...]) -> Any:
        """Context manager: independent stages in ``cfg.workers`` processes beside this one while the block runs
        here (:func:`background_stages`; with ``workers`` 1, none: they run where they are read), with ``locked``
        splits locked; their results (and reads) are read later with :meth:`stage` / :meth:`stages`. The CPU is
        shared (one process more than ``workers``): the numbers are the same, only the wall time changes."""
        workers = self.cfg.workers if self.cfg.workers > 1 else 0
        return background_stages(self.work, [(n, self.stamped(st), f) for n, st, f in jobs], workers,
                                 self.cfg.threads, frozenset(locked))

    def stamp(self, name: str) -> str | None:
        return stamp_of(self.work, name)

    @contextmanager
    def phase(self, name: str, locked: tuple[str, ...] = ()) -> Iterator[None]:
        """Stages run inside see ``locked`` splits locked (:mod:`negdpo.core.split_lock`; worker processes too);
        the files they and the code between them open per split are added to ``reads[name]``."""
        outer, self.current_phase = self.current_phase, name
        try:
            with locked_splits(locked) as record:
                yield
        finally:
            self.current_phase = outer
        self.reads.setdefault(name, Counter()).update(record.reads)

    def selection(self) -> Any:
        """The phase every choice and every training run belongs to: the test split is locked."""
        return self.phase("selection", ("test",))
