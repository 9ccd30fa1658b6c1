"""Measure one saliency lever on a phantom set: Dice per lesion group, report prompt vs irrelevant prompt.

    python scripts/probe_saliency.py --phantoms DIR --ckpt local-dir:CKPT --label NAME \
        [--opts '{"m2ib_beta": 0.1, "m2ib_steps": 5, "m2ib_samples": 5}'] [--results FILE.jsonl]

Runs ``negdpo.segmentation.evaluate.evaluate`` (split ``test``, SAM off unless ``--opts`` says otherwise) and
appends one JSON line: Dice on the test positives overall and per group (``negdpo.study.data.lesion_groups``),
the irrelevant-prompt Dice, the paired gap (report - irrelevant) with its bootstrap 95% CI, and the mean
correlation of the two saliency maps. The table in ``docs/saliency_levers.md`` was built from these lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def summarise_rows(rows: list[dict], groups: dict[str, str]) -> dict:
    """Positives only: mean Dice (report / irrelevant prompt) overall and per group, the paired gap and its CI."""
    import numpy as np
    from negdpo.core.stats import bootstrap_ci

    pos = [r for r in rows if r["positive"]]
    out: dict = {"n": len(pos)}
    for key, subset in [("all", pos)] + [(g, [r for r in pos if groups.get(r["image"]) == g])
                                         for g in ("mri_bright", "mri_dark", "us")]:
        out[key] = float(np.mean([r["dice"] for r in subset])) if subset else float("nan")
        out[f"{key}_irrelevant"] = float(np.mean([r["control_dice"] for r in subset])) if subset else float("nan")
    gap = bootstrap_ci([r["dice"] - r["control_dice"] for r in pos], n_boot=2000, seed=0)
    out["gap"], out["gap_ci"] = gap[0], [gap[1], gap[2]]
    out["map_corr"] = float(np.nanmean([r["control_saliency_corr"] for r in pos]))
    out["coarse_area_frac"] = float(np.mean([r["coarse_area"] for r in pos])) / float(
        np.mean([r["gt_area"] for r in pos]) or 1.0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phantoms", required=True)
    ap.add_argument("--ckpt", required=True, help="CLIP name (local-dir:FOLDER, tiny, ...)")
    ap.add_argument("--label", required=True)
    ap.add_argument("--opts", default="{}", help="JSON of EvalConfig fields")
    ap.add_argument("--results", default="/tmp/h4/levers.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch
    from negdpo.segmentation.evaluate import DEFAULT_CONTROL, evaluate

    from negdpo.study.data import lesion_groups

    torch.set_num_threads(args.threads)
    opts = {"saliency": "m2ib", "sam": "none", "control_prompt": DEFAULT_CONTROL, "save_images": False, "bootstrap": 10,
            "device": args.device, **json.loads(args.opts)}
    t0 = time.perf_counter()
    from negdpo.core.scans import ScanFolder

    scans = [s for s in ScanFolder(args.phantoms).load_split("test") if s.positive]  # positives only
    res = evaluate(None, {"probe": args.ckpt}, None, scans=scans, **opts)
    out = {"label": args.label, "ckpt": args.ckpt, "opts": opts, "eval_s": round(time.perf_counter() - t0, 1),
           **summarise_rows(res.rows, lesion_groups(Path(args.phantoms)))}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as fh:
        fh.write(json.dumps(out) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
