"""The study's last stage: the ``results.json`` contract, the per-image CSVs, the figures and ``results.md``."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from negdpo.core.stats import subject_ci
from negdpo.core.tables import write_csv
from negdpo.study.cache import StudyRun
from negdpo.study.clips import Checkpoints, clip_seeds, pretrain_split
from negdpo.study.generators import GeneratorTable, generator_seeds
from negdpo.study.markdown import render_markdown
from negdpo.study.protocol import protocol
from negdpo.study.report import plot_curves
from negdpo.study.segmentation import Evaluation
from negdpo.study.tables import (
    adjust_family,
    by_subject,
    comparisons,
    generator_comparisons,
    generator_rows,
    noise,
    num,
    saliency_diagnostics,
    segmentation_rows,
    twin_outside_mi,
)
from negdpo.study.variants import (
    COMPARISONS,
    DESIGN_COMPARISONS,
    OTHER_COMPARISONS,
    TWINFREE_COMPARISONS,
    gen_comparisons,
    stage2_comparisons,
)


def copy_figures(run: StudyRun, adapters: dict[str, str], ckpts: Checkpoints, gen_variants: list[str],
                 clip_variants: list[str]) -> None:
    """Training curves of the generators and of the first seed's CLIPs, and the fine-tunes' t-SNE plots."""
    figures, first = run.out / "figures", str(clip_seeds(run.cfg)[0])
    plot_curves({v: Path(adapters[v]) / "metrics.jsonl" for v in gen_variants}, figures / "generator_curves.png",
                ("loss", "rewards/accuracies"), "Generator training (SFT: denoising loss; DPO variants: Diffusion-DPO)")
    plot_curves({v: Path(ckpts[v, first]).parent / "metrics.jsonl" for v in clip_variants},
                figures / "clip_curves.png", ("loss", "rewards/accuracies"), f"CLIP training (seed {first})")
    for name in ("dpo_gen", "dpo_twin", "stages"):
        if (name, first) in ckpts:
            for tsne in Path(ckpts[name, first]).parent.glob("tsne*.png"):
                shutil.copy(tsne, figures / f"tsne_{name}.png")


def portable(obj: Any, roots: dict[str, Path]) -> Any:
    """``obj`` (JSON-able) with every path under a root written relative to it: ``{"work_dir": work}`` turns
    ``/abs/work/pairs/pairs`` (also inside ``local-dir:...``) into ``pairs/pairs``. The config's own ``out`` /
    ``work_dir``, when absolute, become relative to ``roots["out"]`` (``.`` and e.g. ``../work``); relative ones
    stay as given (relative to where the study ran). No committed result names the machine it ran on."""
    absolute = sorted({str(p) + "/" for root in roots.values() for p in (Path(root).absolute(), Path(root).resolve())},
                      key=len, reverse=True)
    relative = [str(r) + "/" for r in roots.values() if not Path(r).is_absolute() and str(r) not in ("", ".")]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str):
            for prefix in absolute:
                x = x.replace(prefix, "")
            for prefix in relative:
                x = x.removeprefix(prefix).replace(f"local-dir:{prefix}", "local-dir:")
        return x

    out = walk(obj)
    if isinstance(out, dict) and isinstance(out.get("config"), dict) and "out" in roots:
        for key in ("out", "work_dir"):
            if out["config"].get(key) and Path(out["config"][key]).is_absolute():
                out["config"][key] = os.path.relpath(out["config"][key], Path(roots["out"]).absolute())
    return out


def families(pg_best_variant: str) -> dict[str, tuple[tuple[tuple, tuple[str, ...]], ...]]:
    """{family: ((comparisons, metrics), ...)}, fixed before the test split is read; Holm adjusts each family.
    ``clip`` is the primary question (the data-matched design on Dice); the MDE of the design is for it."""
    return {"clip": ((DESIGN_COMPARISONS, ("dice",)),),
            "clip_twinfree": ((TWINFREE_COMPARISONS, ("dice",)),),
            "clip_secondary": ((DESIGN_COMPARISONS + TWINFREE_COMPARISONS, ("prompt_gap",)),
                               (OTHER_COMPARISONS, ("dice", "prompt_gap"))),
            "clip_saliency": ((COMPARISONS, ("sal_auroc",)),),  # the map itself, without k-means/SAM
            "stage2": ((stage2_comparisons(pg_best_variant), ("dice", "prompt_gap")),)}


def write_results(run: StudyRun, *, version: str, t_start: float, long_rows: list[dict], evaluation: Evaluation,
                  gen: GeneratorTable, pairs_summary: dict, stage2: dict, sam_info: dict | None) -> dict[str, Any]:
    """``results.json``, ``generator_metrics.csv``, ``segmentation_metrics.csv`` and ``results.md`` under ``out``."""
    cfg, out = run.cfg, run.out
    n_boot, seed = cfg.bootstrap, cfg.seed
    compared = [adjust_family([row for pairs, metrics in members for metric in metrics
                               for row in comparisons(long_rows, n_boot, seed, metric, pairs, family)], family)
                for family, members in families(cfg.pg_best_variant).items()]  # Holm over each family
    oracle = subject_ci(by_subject(evaluation.oracle_rows, "dice"), cfg.bootstrap, cfg.seed)
    results = {"preset": cfg.preset, "code_version": version,
               "n_test_positive": len({r["image"] for r in long_rows}),
               "oracle_box_dice": num(oracle[0]), "oracle_box_dice_ci": [num(oracle[1]), num(oracle[2])],
               "segmentation": segmentation_rows(long_rows, cfg.bootstrap, cfg.seed),
               "comparisons": [row for rows in compared for row in rows],
               "stage2": stage2, "sam_pretrain": sam_info, "oracle_sam": evaluation.oracle_sam,
               "saliency_diagnostics": saliency_diagnostics(long_rows, n_boot, seed),
               "noise": noise(long_rows, DESIGN_COMPARISONS,
                              n_comparisons=len(compared[0])),
               "generator": generator_rows(gen.rows, cfg.bootstrap, cfg.seed, judged=gen.judges is not None),
               "generator_comparisons": generator_comparisons(
                   gen.rows, n_boot, seed, pairs=gen_comparisons(cfg.twinfree_rounds if cfg.twinfree_rows else 0)),
               "twin_outside_mi": twin_outside_mi(gen.rows, cfg.bootstrap, cfg.seed),
               "realism_auc": {r["method"] + ("_no_paste" if r["paste_back"] is False else ""): r["auc"]
                               for r in gen.realism if r.get("run") in ("", str(cfg.seed))},
               "realism": gen.realism, "generator_seeds": generator_seeds(cfg),
               "lesion_detector": gen.judges and {k: gen.judges[k] for k in ("info", "held_out_accuracy")},
               "seeds": clip_seeds(cfg), "clip_pretrain_split": pretrain_split(cfg), "pairs": pairs_summary,
               "protocol": protocol(run), "stage_seconds": run.stage_seconds, "config": asdict(cfg)}
    results = portable(json.loads(json.dumps(results, default=str)), {"out": out, "work_dir": run.work})
    results["paths"] = "relative to the work dir (config.work_dir) or to this folder"
    roots = {"out": out, "work_dir": run.work}
    write_csv(out / "generator_metrics.csv", portable(gen.rows, roots))
    write_csv(out / "segmentation_metrics.csv", portable(long_rows, roots))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    (out / "results.md").write_text(render_markdown(results, figures, time.perf_counter() - t_start))
    print(f"[study] results: {out / 'results.md'}", flush=True)
    return results
