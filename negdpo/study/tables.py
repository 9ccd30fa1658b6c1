"""The study's ``results.json`` contract, built from the long per-image rows of the stages:

* segmentation: one row per (variant, seed, image, prompt) with ``dice``, ``subject_id`` and ``group``;
* generator: one row per (method, paste_back, image) with the repair metrics of
  :func:`negdpo.generator.evaluate.repair_metrics`, ``subject_id`` and ``modality``.

Every interval is a 95% percentile bootstrap (:mod:`negdpo.core.stats`, docs/method.md#statistics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from negdpo.core.stats import Stat, paired_diff_ci, subject_ci, verdict
from negdpo.study.variants import COMPARISONS, GROUPS, MODALITIES, PROMPTS, VARIANTS


def num(x: Any) -> float | None:
    """A finite float, else None (JSON has no NaN)."""
    if x is None or x == "":
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(stat: Stat) -> list[float | None]:
    return [num(stat[1]), num(stat[2])]


def by_subject(rows: Iterable[dict], key: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        v = num(r.get(key))
        if v is not None:
            out.setdefault(str(r["subject_id"]), []).append(v)
    return out


def _paired(rows: Iterable[dict]) -> dict[str, float]:
    """{"image|seed": dice} of finite values."""
    return {f"{r['image']}|{r['seed']}": float(r["dice"]) for r in rows if num(r.get("dice")) is not None}


# -- segmentation ----------------------------------------------------------------------------------
def segmentation_rows(long_rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """One contract row per (variant, prompt) that ran; the prompt gap (report - irrelevant) on report rows."""
    out = []
    for variant in VARIANTS:
        mine = [r for r in long_rows if r["variant"] == variant]
        if not mine:
            continue
        for prompt in PROMPTS:
            rows = [r for r in mine if r["prompt"] == prompt]
            if not rows:
                continue
            stat = subject_ci(by_subject(rows, "dice"), n_boot, seed)
            by_group = {}
            for g in GROUPS:
                vals = [num(r["dice"]) for r in rows if r.get("group") == g]
                vals = [v for v in vals if v is not None]
                by_group[g] = float(np.mean(vals)) if vals else None
            row = {"variant": variant, "prompt": prompt, "dice_mean": num(stat[0]), "dice_ci": _ci(stat),
                   "n_images": len({r["image"] for r in rows}), "n_seeds": len({r["seed"] for r in rows}),
                   "dice_by_group": by_group, "prompt_gap": None, "prompt_gap_ci": None}
            ctl = [r for r in mine if r["prompt"] == "irrelevant"]
            if prompt == "report" and ctl:
                gap = paired_diff_ci(_paired(rows), _paired(ctl), n_boot, seed)
                row.update(prompt_gap=num(gap[0]), prompt_gap_ci=_ci(gap))
            out.append(row)
    return out


def _per_key(long_rows: list[dict], variant: str, metric: str) -> dict[str, float]:
    """{"image|seed": value}: the report-prompt Dice, or the prompt gap (report - irrelevant Dice)."""
    mine = [r for r in long_rows if r["variant"] == variant]
    report = _paired(r for r in mine if r["prompt"] == "report")
    if metric == "dice":
        return report
    ctl = _paired(r for r in mine if r["prompt"] == "irrelevant")
    return {k: report[k] - ctl[k] for k in report.keys() & ctl.keys()}


def comparisons(long_rows: list[dict], n_boot: int, seed: int, metric: str = "dice",
                extra: tuple[tuple[str, str, str], ...] = ()) -> list[dict]:
    """Mean paired per-(image, seed) difference a - b of ``metric`` with its bootstrap CI and a verdict for a.

    ``dice``: Dice with the report prompt; ``prompt_gap``: report − irrelevant-prompt Dice (does a make the
    saliency more prompt-specific than b?). ``extra``: (a, b, question) beyond ``COMPARISONS`` (e.g.
    :func:`stage2_comparisons`). Pairs are (image, seed): a row trained from one seed's chain pairs with
    that seed's rows of b only.
    """
    if metric not in ("dice", "prompt_gap"):
        raise ValueError(f"metric '{metric}': dice or prompt_gap")
    per = {v: _per_key(long_rows, v, metric) for v in VARIANTS}
    out = []
    for a, b, question in (*COMPARISONS, *extra):
        if not per.get(a) or not per.get(b):
            continue
        stat = paired_diff_ci(per[a], per[b], n_boot, seed)
        out.append({"a": a, "b": b, "question": question, "metric": metric, "prompt": "report",
                    "n_pairs": len(set(per[a]) & set(per[b])), "diff_mean": num(stat[0]), "ci": _ci(stat),
                    "verdict": verdict(stat)})
    return out


# -- generator -----------------------------------------------------------------------------------------------
def generator_rows(gen_rows: list[dict], n_boot: int, seed: int, judged: bool = False) -> list[dict]:
    """One contract row per (method, paste_back, modality) with subject-level CIs; ``all`` pools modalities.

    ``paste_back`` is None for the non-learned rows (no repair, harmonic fill: they change nothing outside
    the mask by construction). ``judged``: the rows carry the frozen residual-lesion detector's
    ``lesion_free`` (else ``lesion_free_rate`` stays None: no invented number).
    """
    keys = list(dict.fromkeys((r["method"], r["paste_back"]) for r in gen_rows))
    out = []
    for method, paste in keys:
        for modality in MODALITIES:
            rows = [r for r in gen_rows if r["method"] == method and r["paste_back"] == paste
                    and (modality == "all" or r["modality"] == modality)]
            if not rows:
                continue
            err = subject_ci(by_subject(rows, "inside_err"), n_boot, seed)
            psnr = subject_ci(by_subject(rows, "outside_psnr"), n_boot, seed)
            mi = subject_ci(by_subject(rows, "outside_mi"), n_boot, seed)
            res = subject_ci(by_subject(rows, "residual_lesion"), n_boot, seed)
            out.append({"method": method, "modality": modality, "paste_back": paste, "n_images": len(rows),
                        "inside_err": num(err[0]), "inside_err_ci": _ci(err), "outside_psnr": num(psnr[0]),
                        "outside_psnr_ci": _ci(psnr), "outside_mi": num(mi[0]), "residual_lesion": num(res[0]),
                        "lesion_free_rate": None, "lesion_free_rate_ci": None})
    if judged:
        from negdpo.generator.frozen_judges import add_lesion_free

        add_lesion_free(out, gen_rows, n_boot, seed)
        for r in out:
            r["lesion_free_rate"] = num(r["lesion_free_rate"])
            r["lesion_free_rate_ci"] = [num(v) for v in r["lesion_free_rate_ci"]] if r["lesion_free_rate_ci"] else None
    return out


def twin_outside_mi(gen_rows: list[dict], n_boot: int, seed: int) -> list[float | None]:
    """Outside-mask MI of the healthy twin against the source (the ceiling of the outside MI column)."""
    first = [r for r in gen_rows if r["method"] == gen_rows[0]["method"]] if gen_rows else []
    stat = subject_ci(by_subject(first, "twin_outside_mi"), n_boot, seed)
    return [num(stat[0]), *_ci(stat)]
