"""The study's segmentation stages: the tiny SAM pre-trained on the pool, the zero-shot evaluation of every
CLIP checkpoint (report + irrelevant prompt, one-word prompt, the reference saliency) and the oracle-box
ceiling; and the long per-(variant, seed, image, prompt) rows the tables are built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from negdpo.core.imageio import to_rgb_uint8
from negdpo.core.scans import ScanFolder
from negdpo.segmentation import metrics as M
from negdpo.segmentation.saliency_metrics import COLUMNS as SALIENCY_COLUMNS  # the map's continuous scores
from negdpo.study.cache import Job, StudyRun, json_rows
from negdpo.study.clips import run_key
from negdpo.study.data import subject_of


def long_segmentation_rows(report_rows: list[dict], word_rows: list[dict], groups: dict[str, str],
                           prompt_free: bool = False) -> list[dict]:
    """Per (variant, seed, image, prompt) Dice of positives from the two evaluations.

    ``report_rows``: the evaluation with each scan's report as the prompt and the irrelevant control;
    ``word_rows``: the evaluation with the one-word prompt. Checkpoint names are ``<variant>.s<tag>``
    (:func:`negdpo.study.clips.run_tag`); ``seed`` is the base seed, ``run`` the training run
    (:func:`negdpo.study.clips.run_key`), the unit the comparisons resample.
    ``prompt_free``: rows of a segmenter without a prompt (the prompt generator): one ``report`` row per
    image, no control (its NaN control column is not a Dice). Each row also carries the map's continuous
    saliency scores of its prompt (:data:`SALIENCY_COLUMNS`: lesion AUROC, AP, pointing game, partial r given
    local brightness; ``control_*`` columns for the irrelevant prompt; None where the evaluation has none).
    """
    out = []
    report_keys = (("report", ""),) if prompt_free else (("report", ""), ("irrelevant", "control_"))
    for rows, prompt_keys in ((report_rows, report_keys), (word_rows, (("word", ""),))):
        for r in rows:
            if not int(r.get("positive", 0)):
                continue
            variant, tag = str(r["checkpoint"]).rsplit(".s", 1)
            for prompt, prefix in prompt_keys:
                out.append({"variant": variant, "seed": int(tag.partition("f")[0]), "run": run_key(variant, tag),
                            "image": r["image"], "subject_id": subject_of(r["image"]),
                            "group": groups.get(r["image"], ""), "prompt": prompt, "dice": r.get(f"{prefix}dice"),
                            **{c: _finite(r.get(f"{prefix}{c}")) for c in SALIENCY_COLUMNS}})
    return out


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def oracle_box(phantoms: Path, split: str, sam: str, sam_checkpoint: str | None, device: str) -> list[dict]:
    """Dice of SAM prompted with each positive's ground-truth box: the ceiling of the box-prompted chain."""
    from negdpo.core.models import load_sam
    from negdpo.segmentation.sam_prompt import SamConfig, SamSegmenter

    segmenter = SamSegmenter(load_sam(sam, sam_checkpoint, device), SamConfig(prompt="box", box_mode="union"))
    rows: list[dict[str, Any]] = []
    for s in ScanFolder(phantoms).load_split(split):
        if not s.positive:
            continue
        segmenter.set_image(to_rgb_uint8(s.image))
        pred, _ = segmenter.segment(np.asarray(s.mask, bool), 0)
        rows.append({"image": s.name, "subject_id": subject_of(s.name), "dice": float(M.dice(pred, s.mask))})
    return rows


def pretrain_sam_on_pool(phantoms: Path, out: Path, *, steps: int, seed: int, extra: dict[str, Any]) -> dict:
    """The tiny SAM pre-trained as a promptable segmenter on the ``pretrain`` split only
    (:func:`negdpo.segmentation.sam_pretrain.pretrain_sam`; it refuses any other split)."""
    from negdpo.segmentation.sam_pretrain import SamPretrainConfig, pretrain_sam

    base = dict(data=str(phantoms), split="pretrain", output_dir=str(out / "run"), run_name="sam_pretrain",
                max_train_steps=steps, seed=seed, report_to="none", checkpointing_steps=0, overwrite_output_dir=True)
    res = pretrain_sam(SamPretrainConfig(**{**base, **extra}))
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in res.items()
            if isinstance(v, (int, float, str, bool))}  # JSON has no NaN (no held-out pool lesion: no val Dice)


def pretrain_sam(run: StudyRun) -> tuple[str | None, dict | None]:
    """Stage ``sam_pretrain`` (``sam_pretrain_steps`` > 0): the SAM of the chain (``eval_sam: tiny``), of the
    oracle-box row and of the prompt-generator rows. Returns (checkpoint or the ``eval_extra`` one, info)."""
    job = sam_job(run)
    if job is None:
        return run.cfg.eval_extra.get("sam_checkpoint"), None
    info = run.stage(*job)
    return info["checkpoint"], info


def sam_job(run: StudyRun) -> Job | None:
    """The stage ``sam_pretrain`` as a picklable job (it depends on the pool only); None when it is off."""
    cfg = run.cfg
    if cfg.sam_pretrain_steps <= 0:
        return None
    return ("sam_pretrain", {"phantoms": run.ph_settings, "steps": cfg.sam_pretrain_steps, "seed": cfg.seed,
                             "extra": cfg.sam_pretrain_extra},
            partial(pretrain_sam_on_pool, run.phantoms, steps=cfg.sam_pretrain_steps, seed=cfg.seed,
                    extra=cfg.sam_pretrain_extra))


def eval_options(cfg: Any, sam_checkpoint: str | None) -> dict[str, Any]:
    """The evaluation settings every zero-shot chain of the study shares (test split, report prompt + control)."""
    options = {"split": "test", "saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "seed": cfg.seed,
               "device": cfg.device, "bootstrap": 200, "control_prompt": cfg.prompt_irrelevant} | cfg.eval_extra
    options.pop("overwrite_output_dir", None)
    if sam_checkpoint:
        options["sam_checkpoint"] = sam_checkpoint
    return options


@dataclass
class Evaluation:
    """The zero-shot evaluation's per-image rows and the chain settings the later stages reuse."""

    rows: list[dict]  # report prompt + irrelevant control (and the reference saliency's rows)
    word_rows: list[dict]
    options: dict[str, Any]
    oracle_rows: list[dict] = field(default_factory=list)
    oracle_sam: str | None = None


def evaluate_stage(phantoms: str, clips: dict[str, str], options: dict[str, Any], d: Path) -> dict:
    """One evaluation stage body (picklable with ``functools.partial``): ``clips`` through the zero-shot chain into
    ``d/eval`` (the stage owns ``d``: a rerun replaces its evaluation)."""
    from negdpo.segmentation.evaluate import evaluate

    res = evaluate(phantoms, clips, str(d / "eval"), overwrite_output_dir=True, **options)
    return {"rows": json_rows(res.rows), "report": str(d / "eval" / "report.md")}


def oracle_stage(phantoms: Path, sam: str, sam_checkpoint: str | None, device: str, d: Path) -> dict:
    """The stage body of ``oracle_box`` on the test split."""
    return {"rows": oracle_box(phantoms, "test", sam, sam_checkpoint, device)}


def evaluate_checkpoints(run: StudyRun, ckpts: dict[tuple[str, str], str], sam_checkpoint: str | None) -> Evaluation:
    """Stages ``evaluate_s<seed>``, (``evaluate_word_s<seed>``), (``evaluate_reference``), (``oracle_box``): every
    CLIP checkpoint through the zero-shot chain on the test subjects, one stage per base seed and prompt; the
    stages are independent and share the workers."""
    cfg, phantoms = run.cfg, run.phantoms
    clips = {f"{v}.s{sd}": f"local-dir:{p}" for (v, sd), p in ckpts.items()}
    settings = {"clips": {f"{v}.s{sd}": run.stamp(f"clip_{v}_s{sd}") for v, sd in ckpts},
                "saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "extra": cfg.eval_extra, "phantoms": run.ph_settings,
                "irrelevant": cfg.prompt_irrelevant, "sam_stamp": run.stamp("sam_pretrain")}
    options = eval_options(cfg, sam_checkpoint)
    word = {"prompt_template": cfg.prompt_word, "control_prompt": None, "save_images": False}
    # one stage per base seed (its base and fine-tunes; a fixed split, whatever the workers): parallel stages
    by_seed: dict[str, dict[str, str]] = {}
    for name, clip in clips.items():
        by_seed.setdefault(name.rsplit(".s", 1)[1].partition("f")[0], {})[name] = clip
    jobs, parts = [], {"report": [], "word": []}
    for sd, part in by_seed.items():
        part_settings = settings | {"clips": {k: settings["clips"][k] for k in part}}
        jobs.append((f"evaluate_s{sd}", part_settings, partial(evaluate_stage, str(phantoms), part, options)))
        parts["report"].append(jobs[-1][0])
        if cfg.eval_word:
            jobs.append((f"evaluate_word_s{sd}", part_settings | {"word": cfg.prompt_word},
                         partial(evaluate_stage, str(phantoms), part, options | word)))
            parts["word"].append(jobs[-1][0])
    if cfg.eval_reference_saliency:  # the same base chain through another saliency (MedCLIP-SAMv2's M2IB, say)
        ref = {"saliency": cfg.eval_reference_saliency} | cfg.eval_reference_extra
        ref_clips = {f"base_reference.s{sd}": clips[f"base.s{sd}"] for v, sd in ckpts if v == "base"}
        jobs.append(("evaluate_reference", settings | {"reference": ref},
                     partial(evaluate_stage, str(phantoms), ref_clips, options | ref)))
    oracle_sam = cfg.eval_sam if cfg.eval_sam != "none" else ("tiny" if cfg.sam_pretrain_steps > 0 else None)
    if oracle_sam:
        jobs.append(("oracle_box", {"sam": oracle_sam, "checkpoint": sam_checkpoint, "phantoms": run.ph_settings,
                                    "sam_stamp": run.stamp("sam_pretrain")},
                     partial(oracle_stage, phantoms, oracle_sam, sam_checkpoint, run.device)))
    done = dict(zip([j[0] for j in jobs], run.stages(jobs)))
    rows, word_rows = ([r for name in parts[prompt] for r in done[name]["rows"]] for prompt in ("report", "word"))
    rows = rows + done.get("evaluate_reference", {}).get("rows", [])
    return Evaluation(rows=rows, word_rows=word_rows, options=options, oracle_sam=oracle_sam,
                      oracle_rows=done.get("oracle_box", {}).get("rows", []))
