"""``negdpo evaluate --segmenter prompt-free:DIR``: prompt-free segmentation with a trained stage-2 model.

No CLIP, saliency or prompt: every scan goes through SAM's encoder once and the generator's queries
give the masks. The outputs are those of the zero-shot chain (``metrics.csv``, ``summary.json``,
``report.md``, ``masks/``, ``overlays/``) under one checkpoint name, ``prompt-generator``; the overlay's
"saliency" tile is the generator's probability map (max over queries of score x mask probability), its
"coarse" tile the union of the kept queries' auxiliary masks. Control-prompt columns are NaN.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..eval_output import image_path, write_outputs

logger = logging.getLogger(__name__)
PREFIX = "prompt-free:"
OLD_PREFIX = "prompt-generator:"  # deprecated spelling, accepted for one release
NAME = "prompt-generator"  # the checkpoint label of the rows (kept: cached study evaluations are keyed by it)


def prompt_free_dir(segmenter: str) -> Path | None:
    """The saved model of ``prompt-free:DIR``; None for ``sam`` (the zero-shot chain); else an error."""
    from .inference import find_saved

    if segmenter == "sam":
        return None
    if segmenter.startswith(OLD_PREFIX):
        warnings.warn(f"--segmenter {OLD_PREFIX}DIR is deprecated; use {PREFIX}DIR", DeprecationWarning, stacklevel=2)
        segmenter = PREFIX + segmenter[len(OLD_PREFIX):]
    if segmenter.startswith(PREFIX) and segmenter[len(PREFIX):]:
        return find_saved(segmenter[len(PREFIX):])
    raise ValueError(f"segmenter '{segmenter}': use sam or {PREFIX}DIR")


def run_prompt_free(cfg: Any, scan_list: list, skipped: list, out_dir: Path | None) -> Any:
    """Score every scan with the generator named by ``cfg.segmenter``; returns an ``EvalResult``."""
    from negdpo.core.config import code_version, resolve_device
    from negdpo.core.imageio import save_png

    from .. import metrics as M
    from ..report import summarise, write_overlay
    from .inference import PromptFreeSegmenter, load_prompt_free

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    folder = prompt_free_dir(cfg.segmenter)
    model, meta = load_prompt_free(folder, cfg.sam_checkpoint, device)
    segmenter = PromptFreeSegmenter(model, float(meta.get("score_threshold", 0.5)))
    label = folder.parent.name if folder.name == "final" else folder.name  # the training run's folder name
    rows: list[dict[str, Any]] = []
    for scan in scan_list:
        pred, info = segmenter.segment(scan.image)
        gt = np.asarray(scan.mask, bool)
        coarse, prob = info["coarse"], info["prediction"].prob
        row: dict[str, Any] = {"checkpoint": NAME, "image": scan.name, "positive": int(gt.any()), "prompt": "",
                               "gt_area": int(gt.sum()), "coarse_area": int(coarse.sum()), "pred_area": int(pred.sum()),
                               "empty_coarse": int(not info["keep"].any()), "n_prompts": info["n_prompts"]}
        row.update(M.all_metrics(pred, gt, cfg.tolerance))
        row.update(coarse_dice=M.dice(coarse, gt), coarse_nsd=M.nsd(coarse, gt, cfg.tolerance),
                   control_dice=math.nan, control_coarse_dice=math.nan, control_saliency_corr=math.nan,
                   saliency_path="", mask_path="", overlay_path="")
        if out_dir is not None and cfg.save_images:
            paths = {k: image_path(out_dir, k, NAME, scan.name, False) for k in ("saliency", "coarse", "masks",
                                                                                  "overlays")}
            save_png(paths["saliency"], prob)
            save_png(paths["coarse"], coarse)
            save_png(paths["masks"], pred)
            write_overlay(paths["overlays"], scan.image, prob, coarse, pred, gt, row["dice"],
                          title=f"{scan.name} | prompt-free {label}")
            for key, kind in (("saliency_path", "saliency"), ("mask_path", "masks"), ("overlay_path", "overlays")):
                row[key] = paths[kind].relative_to(out_dir).as_posix()
        rows.append(row)
    summary = summarise(rows, [NAME], n_boot=cfg.bootstrap)
    summary.update(config=asdict(cfg), device=device, code_version=code_version(),
                   timing={"total_s": time.perf_counter() - t_start}, layout="flat", generator=meta,
                   skipped=[{"file": f, "reason": why} for f, why in skipped])
    return write_outputs(out_dir, cfg, summary, rows)
