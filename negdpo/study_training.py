"""The study's training stages (generator and CLIP runs) and the parallel warm-up of independent stages.

:func:`prefetch_parallel` runs the not yet cached stages of a batch of independent ones (the base CLIPs of
the seeds, the fine-tunes) in ``workers`` processes; the study's serial pass then finds them cached, so
``workers`` changes the wall time only: each stage seeds itself and writes only its own folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("negdpo.study")


def _gen_config(cfg: Any, phantoms: Path, out: Path, **overrides):
    from negdpo.generator.train import GenTrainConfig

    base = dict(pretrained_model_name_or_path=cfg.gen_model, dataset_name=str(phantoms), run_name=out.name,
                output_dir=str(out),
                seed=cfg.seed, beta=cfg.gen_beta, learning_rate=cfg.gen_lr, train_batch_size=cfg.gen_batch,
                sdpo_mu=cfg.gen_sdpo_mu, cache_latents=True, report_to="tensorboard", checkpointing_steps=0,
                validation_steps=0, resume_from_checkpoint="latest")
    base.update(cfg.gen_extra)
    base.update(overrides)
    return GenTrainConfig(**base)


def train_generator(cfg: Any, phantoms: Path, out: Path, **overrides) -> dict:
    from negdpo.generator.train import train

    summary = train(_gen_config(cfg, phantoms, out, **overrides))
    return {"adapter": str(out), "summary": {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}}


def train_clip(cfg: Any, out: Path, model: str, data: str, loss: str, steps: int, lr: float, seed: int,
               **overrides) -> dict:
    from negdpo.preference.clip.train import ClipTrainConfig, train

    base = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), run_name=out.name,
                loss=loss, seed=seed, max_train_steps=steps, learning_rate=lr, train_batch_size=cfg.clip_batch,
                report_to="tensorboard", resume_from_checkpoint="latest", progress_bar=True, validation_steps=0,
                checkpointing_steps=0)
    base.update(overrides)
    base.update(cfg.clip_extra)  # the user's extras win (e.g. tsne: false for a quick run)
    summary = train(ClipTrainConfig(**base))
    return {"checkpoint": str(summary.get("checkpoint", out / "final")),
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}}


def clip_job(cfg: Any, model: str, data: str, loss: str, steps: int, lr: float, seed: int, overrides: dict,
             out: Path) -> dict:
    """:func:`train_clip` with the stage folder last: ``functools.partial(clip_job, ...)`` is a picklable stage body."""
    return train_clip(cfg, out, model, data, loss, steps, lr, seed, **overrides)


def _init_worker(threads: int) -> None:
    import torch

    from negdpo.core.console import setup_logging

    setup_logging()
    if threads > 0:
        torch.set_num_threads(threads)


def _run_in_worker(work: Path, name: str, settings: dict, fn: Callable[[Path], dict]) -> str:
    from negdpo.study import run_stage

    run_stage(work, name, settings, fn)
    return name


def prefetch_parallel(work: Path, jobs: list[tuple[str, dict, Callable[[Path], dict]]], workers: int,
                      threads: int) -> list[str]:
    """Run the uncached ``(name, settings, fn)`` stages in ``workers`` spawned processes; names run there.

    ``settings`` are the full stamp settings (as :func:`negdpo.study.run_stage` gets them) and every ``fn``
    must pickle (a module-level function or a ``functools.partial`` of one). With fewer than two uncached
    stages, or ``workers`` <= 1, nothing runs here and the serial pass does the work.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from negdpo.study import cached_result

    todo = [j for j in jobs if cached_result(work, j[0], j[1]) is None]
    if workers <= 1 or len(todo) < 2:
        return []
    logger.info("running %d stages in %d processes: %s", len(todo), workers, ", ".join(j[0] for j in todo))
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_run_in_worker, work, *job) for job in todo]
        return [f.result() for f in futures]  # a failed stage raises here, after the others finished
