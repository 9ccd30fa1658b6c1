"""The study's segmentation stages beyond the zero-shot chain: stage 2 (the prompt generator trained on
pseudo-labels or on ground truth, evaluated prompt-free) and VL-SAM (a tiny VLM trained on the pre-training
pool as a report generator, its attention flow -> SAM points / the coarse mask).

Each stage body returns JSON-able results (per-image evaluation rows under ``rows``) and writes only under the
stage folder it is given. Evaluation rows are renamed to the study's checkpoint names ``<variant>.s<seed>``,
so :func:`negdpo.study.segmentation.long_segmentation_rows` reads them like the CLIP rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from negdpo.core.imageio import read_mask, save_png
from negdpo.core.scans import ScanFolder
from negdpo.core.split_lock import locked_splits
from negdpo.segmentation import metrics as M
from negdpo.study.cache import StudyRun, json_rows
from negdpo.study.data import image_labels, lesion_groups
from negdpo.study.segmentation import long_segmentation_rows
from negdpo.study.variants import PG_ROWS


def pseudo_labels(phantoms: Path, clip: str, out: Path, options: dict[str, Any], split: str = "train") -> dict:
    """Stage-1 masks of ``split`` from one CLIP's zero-shot chain: the weak supervision of stage 2.

    The chain (``options``: the study's evaluation settings) runs on the images whose report says tumour,
    with their report as the prompt; every image whose report says healthy gets an empty mask (the
    image-level label is known from the report, the lesion's extent is not). Writes ``out/labels/<file>``
    (one mask per image of the split, the folder ``seg_train --targets`` reads) and returns its path with
    the pseudo-labels' Dice against the ground truth (how good the weak supervision is; never used for
    training).
    """
    from negdpo.segmentation.evaluate import evaluate

    labels = image_labels(phantoms, split)
    scans = ScanFolder(phantoms).load_split(split)
    positives = [s for s in scans if labels.get(s.name)]
    opts = {**options, "split": split, "control_prompt": None, "prompt_template": None, "save_images": True}
    t0 = time.perf_counter()
    res = evaluate(str(phantoms), {"stage1": clip}, str(out / "eval"), scans=positives, overwrite_output_dir=True,
                   **opts)
    seconds = time.perf_counter() - t0
    rows = {r["image"]: r for r in res.rows}
    target = out / "labels"
    target.mkdir(parents=True, exist_ok=True)
    dice = []
    for s in scans:
        if s.name in rows:
            mask = read_mask(out / "eval" / rows[s.name]["mask_path"])
            dice.append(M.dice(mask, np.asarray(s.mask, bool)))
        else:
            mask = np.zeros(s.mask.shape, bool)
        save_png(target / s.name, mask)
    return {"targets": str(target), "n_images": len(scans), "n_pseudo": len(positives),
            "pseudo_dice_vs_gt": float(np.mean(dice)) if dice else None, "chain_seconds": round(seconds, 1)}


def train_and_eval_pg(phantoms: Path, targets: str, out: Path, name: str, *, steps: int, lr: float, batch: int,
                      seed: int, sam: str, sam_checkpoint: str | None, device: str, extra: dict[str, Any],
                      eval_options: dict[str, Any]) -> dict:
    """Train the prompt generator on the train split (``targets``: ``""`` = ground truth, else a mask folder),
    then segment the test split prompt-free; rows are named ``name``."""
    from negdpo.segmentation.evaluate import evaluate
    from negdpo.segmentation.prompt_free.train import SegTrainConfig, train

    base = dict(data=str(phantoms), targets=targets, train_split="train", output_dir=str(out / "run"),
                run_name=name, max_train_steps=steps, learning_rate=lr, train_batch_size=batch, seed=seed,
                sam=sam, sam_checkpoint=sam_checkpoint, report_to="none", eval_images=0, checkpointing_steps=0,
                resume_from_checkpoint=None, overwrite_output_dir=True)
    with locked_splits(("test",)):  # training sees train only; the test split is read by the evaluation below
        summary = train(SegTrainConfig(**{**base, **extra}))
    t0 = time.perf_counter()
    res = evaluate(str(phantoms), {name: "tiny"}, str(out / "eval"), overwrite_output_dir=True, split="test",
                   segmenter=f"prompt-free:{summary['checkpoint']}", sam_checkpoint=sam_checkpoint,
                   device=device, seed=seed, save_images=False, bootstrap=eval_options.get("bootstrap", 200),
                   tolerance=eval_options.get("tolerance", 2.0))
    return {"rows": json_rows(res.rows, name), "checkpoint": summary["checkpoint"], "targets": targets or "gt",
            "train_images": summary.get("train_images"), "n_targets": summary.get("targets"),
            "train_seconds": summary.get("wall_s"), "eval_seconds": round(time.perf_counter() - t0, 1)}


def train_vlm_on_pool(phantoms: Path, out: Path, *, split: str, steps: int, lr: float, batch: int, seed: int,
                      extra: dict[str, Any]) -> dict:
    """The tiny VLM taught to write the reports of ``split`` (the pre-training pool): image -> report text."""
    from negdpo.segmentation.vlm_train import VlmTrainConfig, train_vlm

    base = dict(model="tiny", data=str(phantoms), split=split, eval_split="", output_dir=str(out / "run"),
                run_name="vlm", max_train_steps=steps, learning_rate=lr, train_batch_size=batch, seed=seed,
                report_to="none", checkpointing_steps=0, overwrite_output_dir=True)
    res = train_vlm(VlmTrainConfig(**{**base, **extra}))
    losses = res["losses"]
    k = max(1, min(10, len(losses) // 5))
    return {"vlm": str(res["vlm"]), "split": split, "steps": steps,
            "loss_first": float(np.mean(losses[:k])) if losses else None,
            "loss_last": float(np.mean(losses[-k:])) if losses else None}


def eval_vlsam(phantoms: Path, vlm: str, out: Path, name: str, *, options: dict[str, Any], word: str,
               irrelevant: str) -> dict:
    """VL-SAM on the test split: the report prompt with the irrelevant control, then the one-word prompt.

    ``options``: the study's evaluation settings (SAM, post-processing, seed, ...); the saliency is
    ``vlsam`` with the VLM folder ``vlm``. Seconds per map = saliency seconds / maps computed."""
    from negdpo.segmentation.evaluate import evaluate

    opts = {**options, "split": "test", "saliency": "vlsam", "vlm": vlm}
    out_rows, seconds, maps = {}, 0.0, 0
    for key, extra in (("report", {"control_prompt": irrelevant}),
                       ("word", {"prompt_template": word, "control_prompt": None})):
        res = evaluate(str(phantoms), {name: "tiny"}, str(out / f"eval_{key}"), overwrite_output_dir=True,
                       **{**opts, **extra})
        out_rows[key] = json_rows(res.rows)
        seconds += float(res.summary.get("timing", {}).get("saliency_s", 0.0))
        maps += len(res.rows) * (2 if extra["control_prompt"] else 1)
    return {"rows": out_rows["report"], "word_rows": out_rows["word"], "maps": maps,
            "saliency_seconds": round(seconds, 2), "seconds_per_map": seconds / maps if maps else None}


def stage2_rows(run: StudyRun, ckpts: dict[tuple[str, str], str], seed: int, options: dict[str, Any],
                pretrain_split: str) -> tuple[list[dict], dict]:
    """Stages ``pseudo_<variant>_s<seed>``, ``pg_*``, ``vlm_pretrain``, ``vlsam``: the stage-2 and VL-SAM rows as
    long segmentation rows + their info.

    ``ckpts``: {(variant, tag): CLIP folder} (:func:`negdpo.study.clips.run_tag`); ``seed``: the CLIP seed whose chains give the pseudo-labels (rows
    are named ``<row>.s<seed>`` and pair with that seed's rows in the comparisons); ``options``: the study's
    evaluation settings. ``pg_steps: 0`` / ``vlm_steps: 0`` switch the rows off.
    """
    cfg, phantoms, stage = run.cfg, run.phantoms, run.stage
    groups = lesion_groups(phantoms)
    rows: list[dict] = []
    info: dict[str, Any] = {"seed": seed, "pg_best_variant": cfg.pg_best_variant, "pseudo_labels": {}, "pg": {}}
    sam_ckpt = options.get("sam_checkpoint")
    chain = {"saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "extra": cfg.eval_extra, "phantoms": run.ph_settings,
             "sam_stamp": run.stamp("sam_pretrain")}
    if cfg.pg_steps > 0:
        pg_sam = cfg.eval_sam if cfg.eval_sam != "none" else "tiny"  # the prompt generator always needs a SAM
        pg_set = {"phantoms": run.ph_settings, "steps": cfg.pg_steps, "lr": cfg.pg_lr, "batch": cfg.pg_batch,
                  "seed": seed, "sam": pg_sam, "sam_stamp": chain["sam_stamp"], "extra": cfg.pg_extra}
        sources = {"pg_pseudo_base": "base", "pg_pseudo_best": cfg.pg_best_variant}
        for row in (r for r in PG_ROWS if r in cfg.pg_rows):
            targets, t_stamp = "", "gt"
            if row in sources:
                variant = sources[row]
                if (variant, str(seed)) not in ckpts:
                    info["pg"][row] = f"skipped: CLIP variant {variant} did not run"
                    continue
                name = f"pseudo_{variant}_s{seed}"
                with run.selection():
                    pl = stage(name, chain | {"clip": run.stamp(f"clip_{variant}_s{seed}")}, lambda d, v=variant:
                               pseudo_labels(phantoms, f"local-dir:{ckpts[v, str(seed)]}", d, options))
                info["pseudo_labels"][variant] = {k: v for k, v in pl.items() if k != "targets"}
                targets, t_stamp = pl["targets"], run.stamp(name)
            res = stage(row, pg_set | {"targets": t_stamp}, lambda d, r=row, t=targets: train_and_eval_pg(
                phantoms, t, d, f"{r}.s{seed}", steps=cfg.pg_steps, lr=cfg.pg_lr, batch=cfg.pg_batch, seed=seed,
                sam=pg_sam, sam_checkpoint=sam_ckpt, device=cfg.device, extra=cfg.pg_extra, eval_options=options))
            info["pg"][row] = {k: v for k, v in res.items() if k != "rows"}
            rows += long_segmentation_rows(res["rows"], [], groups, prompt_free=True)
    if cfg.vlm_steps > 0:
        vlm_set = {"phantoms": run.ph_settings, "split": pretrain_split, "steps": cfg.vlm_steps, "lr": cfg.vlm_lr,
                   "batch": cfg.vlm_batch, "seed": seed, "extra": cfg.vlm_extra}
        with run.selection():
            vlm = stage("vlm_pretrain", vlm_set, lambda d: train_vlm_on_pool(
                phantoms, d, split=pretrain_split, steps=cfg.vlm_steps, lr=cfg.vlm_lr, batch=cfg.vlm_batch, seed=seed,
                extra=cfg.vlm_extra))
        res = stage("vlsam", chain | {"vlm": run.stamp("vlm_pretrain"), "word": cfg.prompt_word,
                                      "irrelevant": cfg.prompt_irrelevant}, lambda d: eval_vlsam(
            phantoms, vlm["vlm"], d, f"vlsam.s{seed}", options=options, word=cfg.prompt_word,
            irrelevant=cfg.prompt_irrelevant))
        info["vlsam"] = {"vlm": vlm, **{k: v for k, v in res.items() if not k.endswith("rows")}}
        rows += long_segmentation_rows(res["rows"], res["word_rows"], groups)
    return rows, info
