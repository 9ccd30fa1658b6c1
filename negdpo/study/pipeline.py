"""``run_study``: the phantom study as a pipeline of cached stages, one function call per stage, in order.

    phantoms (+ a disjoint pre-training pool)
    -> in worker processes meanwhile: the base CLIPs (contrastive pre-training on the pool, one per seed), the
       twin-free chain (``twinfree_rows``: :mod:`negdpo.study.twinfree`, val + test locked), the tiny SAM
       pre-trained on the pool
    -> (autoencoder adapted to the phantoms) -> SFT of the inpainting model on twins -> Diffusion-DPO variants
       (DPO, DPO+MI, DPO+MI+SDPO), per generator seed
    -> generator table on held-out (val+test) positives vs their twins (oracle rows, then the twin-free rows)
    -> preference pairs of the pairs generator, judged with the first seed's base CLIP (+ the harmonic,
       MedCLIP-SAMv2 and twin-free sets) -> fine-tunes of each seed's base
    -> zero-shot segmentation of the test subjects per checkpoint (+ one-word prompt, reference saliency, oracle box)
    -> stage 2 (prompt-free) and VL-SAM rows -> results.json (the contract) + results.md

Stage outputs live under ``work_dir/<stage>/`` (:mod:`negdpo.study.cache`). Same seed -> same numbers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from negdpo.core.config import code_version, resolve_device, seed_everything
from negdpo.core.outdir import prepare_output_dir, run_lock
from negdpo.core.phantoms import ensure_phantoms
from negdpo.study.cache import StudyRun
from negdpo.study.clips import (
    Checkpoints,
    base_clip_jobs,
    base_clips,
    clip_seeds,
    finetune_clips,
    pretrain_split,
)
from negdpo.study.config import StudyConfig
from negdpo.study.data import lesion_groups
from negdpo.study.generators import adapt_autoencoder, generator_seeds, generator_table, train_generators
from negdpo.study.pairs import PAIR_SPLITS, PairSets, build_pairs
from negdpo.study.results import copy_figures, write_results
from negdpo.study.segmentation import evaluate_checkpoints, long_segmentation_rows, pretrain_sam, sam_job
from negdpo.study.stage2 import stage2_rows
from negdpo.study.twinfree import build_twinfree_pairs, train_twinfree_rows, twinfree_job
from negdpo.study.variants import (
    CLIP_VARIANTS,
    DESIGN,
    GEN_VARIANTS,
    TWINFREE_CLIP,
    TWINFREE_VAE,
    twinfree_rows,
)

STUDY_OWNED = ("results.json", "results.md", "*.csv", "figures")  # what the study writes into ``out``
RUN_ONLY = ("out", "work_dir", "device", "threads", "workers", "overwrite_output_dir")  # change the wall time only


def claim_out(cfg: StudyConfig) -> Path:
    """``out`` for this study (:func:`negdpo.core.outdir.prepare_output_dir`): empty, or the results of a study with
    the same settings (replaced), or ``overwrite_output_dir``; anything else is refused before any stage runs."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    out = prepare_output_dir(cfg.out, "study", cfg.overwrite_output_dir, owned=STUDY_OWNED, settings=settings)
    (out / "figures").mkdir(exist_ok=True)
    return out


def start(cfg: StudyConfig) -> StudyRun:
    """The global seed, torch threads and the device of one run (the tuning script's too: it writes no results)."""
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    return StudyRun(cfg=cfg, work=Path(cfg.work_dir), out=out, device=resolve_device(cfg.device),
                    sampling={"init": cfg.gen_init, "strength": cfg.gen_strength})


def make_phantoms(run: StudyRun) -> None:
    """Stage ``phantoms``: the phantom set (+ the pre-training pool), the same for every stage after it."""
    cfg = run.cfg
    area = tuple(cfg.phantoms_lesion_area) if cfg.phantoms_lesion_area else None
    run.ph_settings = {"n": cfg.phantoms_n, "size": cfg.phantoms_size, "slices": cfg.phantoms_slices,
                       "seed": cfg.seed, "pretrain_n": cfg.phantoms_pretrain_n, "lesion_area": area}
    run.phantoms = Path(run.stage("phantoms", run.ph_settings, lambda d: {"path": str(ensure_phantoms(
        d / "data", n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.seed, slices=cfg.phantoms_slices,
        pretrain_n=cfg.phantoms_pretrain_n, lesion_area=area))})["path"])


def finetune_data(run: StudyRun, sets: PairSets) -> dict[str, tuple[str, str, str]]:
    """{CLIP variant: (training set, loss, source)} of the fine-tunes: the loss x negatives design
    (:data:`negdpo.study.variants.DESIGN`), MedCLIP-SAMv2's DHN-NCE and the CLIP-DPO extensions."""
    negatives = {"twin": (str(run.phantoms), "phantoms"), "gen": (sets.pairs["path"], "pairs"),
                 "harmonic": (sets.harmonic or "", "harmonic"), "twinfree": (sets.twinfree or "", "twinfree")}
    data = {variant: (negatives[neg][0], loss, negatives[neg][1]) for (loss, neg), variant in DESIGN.items()}
    pairs = sets.pairs["path"]
    return {"dhn_nce_faithful": (sets.faithful or "", "dhn_nce", "faithful"), **data,
            "dpo_entropy": (pairs, "dpo+entropy", "pairs"), "stages": (pairs, "stages", "pairs")}


def run_study(cfg: StudyConfig) -> dict:
    """Every stage of the study in order (cached stages are read back), then the results files; ``out`` is
    locked and claimed (:func:`claim_out`) before any stage runs."""
    t_start, version = time.perf_counter(), code_version()  # before the run's own outputs make the tree dirty
    with run_lock(cfg.out):  # one study per results folder at a time
        claim_out(cfg)
        return _run_stages(cfg, t_start, version)


def _run_stages(cfg: StudyConfig, t_start: float, version: str) -> dict:
    gen_variants = [v for v in GEN_VARIANTS if v in cfg.gen_variants or v == "sft"]  # SFT = every DPO's reference
    # base = every fine-tune's start; the twin-free CLIP rows come with the twin-free generator rows
    clip_variants = [v for v in CLIP_VARIANTS
                     if v == "base" or (cfg.twinfree_rows if v in TWINFREE_CLIP else v in cfg.clip_variants)]
    tf_rows = list(twinfree_rows(cfg.twinfree_rounds)) if cfg.twinfree_rows else []
    run = start(cfg)
    make_phantoms(run)
    # independent of the oracle generators: the base CLIPs, the twin-free chain (from the untrained model) and the
    # SAM run in worker processes while this one trains and scores the oracle generators (same numbers as in order)
    bases, tf_job = base_clip_jobs(run), twinfree_job(run, generator_seeds(cfg), cfg.gen_model) if tf_rows else None
    early = bases[:1] + [j for j in (tf_job,) if j] + bases[1:] + [j for j in (sam_job(run),) if j]
    with run.background(early, ("test",)):
        with run.selection():  # every training run and every choice: the test split is locked
            run.cfg = replace(run.cfg, gen_model=adapt_autoencoder(run))
            by_seed = {gs: train_generators(run, gen_variants, gs) for gs in generator_seeds(cfg)}
        with run.phase("generator_table"):  # the oracle rows (val + test positives), cached for below; serial
            generator_table(run, gen_variants, by_seed)  # here: the workers run the background stages
    tf_model = ""  # the twin-free autoencoder (tf_rows)
    if tf_job:
        with run.selection():
            run.stage(*tf_job, count=False)  # wait for it (or run it here: workers 1); its stages count below
            twinfree, tf_model = train_twinfree_rows(run, generator_seeds(cfg), cfg.gen_model)
        by_seed = {gs: by_seed[gs] | twinfree[gs] for gs in by_seed}
    adapters = by_seed[cfg.seed]  # the first generator seed makes the pairs
    with run.phase("generator_table"):  # + the twin-free rows and their baseline
        gen_table = generator_table(run, gen_variants + tf_rows, by_seed,  # the workers are free again
                                    {row: tf_model for row in [*tf_rows, TWINFREE_VAE] if tf_rows}, parallel=True)
    first = clip_seeds(cfg)[0]
    with run.selection():
        ckpts: Checkpoints = base_clips(run)
        sets = build_pairs(run, adapters, ckpts["base", str(first)], run.stamp(f"clip_base_s{first}"),
                           harmonic=bool({"dpo_harmonic", "dhn_nce_harmonic"} & set(clip_variants)),
                           faithful="dhn_nce_faithful" in clip_variants)
        if tf_rows:  # the twin-free generator's last round (first seed), judged without twins
            last = f"dpo_onpolicy_r{cfg.twinfree_rounds}"
            sets.twinfree = build_twinfree_pairs(run, tf_model, adapters[last], last, PAIR_SPLITS)["path"]
        ckpts |= finetune_clips(run, clip_variants, ckpts, finetune_data(run, sets), sets.settings)
        sam_checkpoint, sam_info = pretrain_sam(run)
    with run.phase("evaluation"):  # the final evaluation: the only stages that read the test split
        evaluation = evaluate_checkpoints(run, ckpts, sam_checkpoint)
    copy_figures(run, adapters, ckpts, gen_variants, clip_variants)
    long_rows = long_segmentation_rows(evaluation.rows, evaluation.word_rows, lesion_groups(run.phantoms))
    extra_rows, stage2 = stage2_rows(run, ckpts, first, evaluation.options, pretrain_split(cfg))
    return write_results(run, version=version, t_start=t_start, long_rows=long_rows + extra_rows,
                         evaluation=evaluation, gen=gen_table, pairs_summary=sets.pairs["summary"], stage2=stage2,
                         sam_info=sam_info)
