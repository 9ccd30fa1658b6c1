"""The files of one segmentation evaluation, whatever the segmenter (``docs/method.md#evaluation-output``).

``evaluate`` (saliency -> SAM) and the prompt-free stage 2 (``prompt_free.evaluation``) both write
through here: ``metrics.csv`` (one row per checkpoint and scan), ``config.json``, ``summary.json`` and
the report, with image paths laid out by :func:`image_path`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from negdpo.core.tables import write_csv

from . import saliency_metrics as SM

CSV_COLUMNS = ["checkpoint", "image", "positive", "prompt", "gt_area", "coarse_area", "pred_area", "empty_coarse",
               "n_prompts", "dice", "iou", "nsd", "nsd_parity", "hd95", "coarse_dice", "coarse_nsd",
               "control_dice", "control_coarse_dice", "control_saliency_corr", *SM.COLUMNS,
               *(f"control_{c}" for c in SM.COLUMNS), "saliency_path", "mask_path", "overlay_path"]


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None = None


def image_path(out: Path, kind: str, ckpt: str, name: str, multi: bool) -> Path:
    """Where an output image goes (flat with one checkpoint, per-checkpoint subfolder otherwise)."""
    folder = out / kind / ckpt if multi else out / kind
    return folder / f"{Path(name).stem}.png"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_outputs(out_dir: Path | None, cfg: Any, summary: dict[str, Any], rows: list[dict[str, Any]]
                  ) -> EvalResult:
    """``metrics.csv``, ``config.json``, ``summary.json`` and the report of one evaluation (any segmenter)."""
    from .report import write_report

    if out_dir is not None:
        write_csv(out_dir / "metrics.csv", rows, CSV_COLUMNS, float_format=".6f")
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
        write_report(out_dir, summary, rows)
    return EvalResult(rows=rows, summary=summary, out=out_dir)
