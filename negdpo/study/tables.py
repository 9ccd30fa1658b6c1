"""The study's ``results.json`` contract, built from the long per-image rows of the stages:

* segmentation: one row per (variant, seed, image, prompt) with ``dice``, ``subject_id`` and ``group``;
* generator: one row per (method, paste_back, image) with the repair metrics of
  :func:`negdpo.generator.evaluate.repair_metrics`, ``subject_id`` and ``modality``.

Every interval is a 95% percentile bootstrap (:mod:`negdpo.core.stats`, docs/method.md#statistics): over
subjects for single rows; comparisons of methods resample training runs, then subjects within each run
(:func:`negdpo.core.stats.run_level_diff`), with Holm-adjusted p-values over each family and the verdict from
them; the subject-only CI (runs fixed) is kept as a labelled secondary number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from negdpo.core.stats import (
    RunLevelStat,
    Stat,
    design_mde,
    holm,
    paired_diff_ci,
    run_level_diff,
    subject_ci,
    variance_components,
    verdict_p,
)
from negdpo.study.variants import (
    COMPARISONS,
    GEN_COMPARISONS,
    GROUPS,
    MODALITIES,
    PROMPTS,
    SUPERVISION,
    VARIANTS,
)


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
    """{"image|run": dice} of finite values."""
    return {f"{r['image']}|{run_of(r)}": float(r["dice"]) for r in rows if num(r.get("dice")) is not None}


def run_of(row: dict) -> str:
    """The training run a long row was scored under: ``"<base seed>/<fine-tune seed>"`` for a fine-tune,
    ``"<seed>"`` for a base CLIP or a row trained from one seed's chain (older rows: their ``seed``)."""
    return str(row.get("run") or row["seed"])


Keyed = dict[tuple[str, str, str], float]  # {(run, subject, image): value}
METRICS = ("dice", "prompt_gap", "sal_auroc")  # of the segmentation comparisons


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
            by_group, n_by_group = {}, {}
            for g in GROUPS:
                vals = [num(r["dice"]) for r in rows if r.get("group") == g]
                vals = [v for v in vals if v is not None]
                by_group[g] = float(np.mean(vals)) if vals else None
                n_by_group[g] = len({r["image"] for r in rows if r.get("group") == g})  # images, not subjects
            auroc = subject_ci(by_subject(rows, "sal_auroc"), n_boot, seed)
            row = {"variant": variant, "prompt": prompt, "dice_mean": num(stat[0]), "dice_ci": _ci(stat),
                   "sal_auroc": num(auroc[0]), "sal_auroc_ci": _ci(auroc),
                   "n_images": len({r["image"] for r in rows}), "n_seeds": len({r["seed"] for r in rows}),
                   "n_runs": len({run_of(r) for r in rows}), "supervision": SUPERVISION.get(variant),
                   "dice_by_group": by_group, "n_by_group": n_by_group, "prompt_gap": None, "prompt_gap_ci": None}
            ctl = [r for r in mine if r["prompt"] == "irrelevant"]
            if prompt == "report" and ctl:
                gap = paired_diff_ci(_paired(rows), _paired(ctl), n_boot, seed)
                row.update(prompt_gap=num(gap[0]), prompt_gap_ci=_ci(gap))
            out.append(row)
    return out


def saliency_diagnostics(long_rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """Per (row, prompt: report | irrelevant, lesion group): the map's lesion AUROC and its partial correlation
    with the lesion mask given local brightness (subject means with CIs): is the map lesion-specific beyond a
    brightness prior (docs/method.md#saliency-metrics)?"""
    out = []
    for variant in VARIANTS:
        for prompt in ("report", "irrelevant"):
            rows = [r for r in long_rows if r["variant"] == variant and r["prompt"] == prompt]
            for group in (*GROUPS, "all"):
                mine = [r for r in rows if group == "all" or r.get("group") == group]
                if not any(num(r.get("sal_auroc")) is not None for r in mine):
                    continue
                auc = subject_ci(by_subject(mine, "sal_auroc"), n_boot, seed)
                pr = subject_ci(by_subject(mine, "sal_partial_r"), n_boot, seed)
                out.append({"variant": variant, "prompt": prompt, "group": group, "n_images": len(mine),
                            "sal_auroc": num(auc[0]), "sal_auroc_ci": _ci(auc), "sal_partial_r": num(pr[0]),
                            "sal_partial_r_ci": _ci(pr)})
    return out


def _keyed(rows: Iterable[dict], key: str = "dice") -> Keyed:
    """{(run, subject, image): value of ``key``} of finite values."""
    return {(run_of(r), str(r["subject_id"]), str(r["image"])): float(r[key]) for r in rows
            if num(r.get(key)) is not None}


def _per_key(long_rows: list[dict], variant: str, metric: str) -> Keyed:
    """The report-prompt Dice or lesion AUROC of the map (``sal_auroc``), or the prompt gap (report -
    irrelevant Dice), per (run, subject, image)."""
    mine = [r for r in long_rows if r["variant"] == variant]
    if metric in ("dice", "sal_auroc"):
        return _keyed((r for r in mine if r["prompt"] == "report"), metric)
    report = _keyed(r for r in mine if r["prompt"] == "report")
    ctl = _keyed(r for r in mine if r["prompt"] == "irrelevant")
    return {k: report[k] - ctl[k] for k in sorted(report.keys() & ctl.keys())}


def align_runs(a: Keyed, b: Keyed) -> Keyed:
    """``b`` on the run keys of ``a``: equal runs pair; a fine-tune run ``s/f`` pairs with its base run ``s``
    (the base's values repeat under each of its fine-tunes); a run ``s`` of a row trained from one seed's chain
    pairs with that chain's first fine-tune ``s/s``."""
    b_runs, to_a = {k[0] for k in b}, {}
    for ra in sorted({k[0] for k in a}):
        if ra in b_runs:
            to_a.setdefault(ra, []).append(ra)
        elif "/" in ra and ra.split("/")[0] in b_runs:
            to_a.setdefault(ra.split("/")[0], []).append(ra)
        elif f"{ra}/{ra}" in b_runs:
            to_a.setdefault(f"{ra}/{ra}", []).append(ra)
    return {(ra, s, i): v for (rb, s, i), v in b.items() for ra in to_a.get(rb, ())}


def decision_p(st: RunLevelStat) -> float:
    """The p a verdict is made from: the larger of the hierarchical bootstrap's p and the paired t test's over
    the run means (with 3 runs the bootstrap rejects a true null in ~20% of simulated studies, the t test in ~6%:
    docs/method.md#statistics); with one run (no t test) the bootstrap's, whose unit then says so."""
    return max(st.p, st.p_t) if math.isfinite(st.p_t) else st.p


def compare(a: Keyed, b: Keyed, n_boot: int, seed: int) -> dict[str, Any]:
    """One paired comparison a - b at the level of training runs (docs/method.md#statistics): the contract's
    fields except the family-adjusted p and the verdict (:func:`adjust_family` adds them)."""
    b = align_runs(a, b)
    # every run is scored on the same test subjects: one subject draw shared by the drawn runs (crossed; the
    # better-calibrated of the two hierarchical bootstraps for this design, docs/method.md#hierarchical-bootstrap)
    st = run_level_diff(a, b, n_boot=n_boot, seed=seed, subjects="crossed")
    return {"n_pairs": len(a.keys() & b.keys()), "n_runs": st.n_runs, "n_subjects": st.n_subjects,
            "diff_mean": num(st.mean), "ci": [num(st.lo), num(st.hi)], "p": num(decision_p(st)),
            "p_boot": num(st.p), "p_holm": None,
            "verdict": "inconclusive", "unit": st.unit,
            "per_run": {r: num(v) for r, v in st.per_run.items()},
            "t_check": {"ci": [num(st.t_ci[0]), num(st.t_ci[1])], "p": num(st.p_t)},
            "subject_only": {"diff_mean": num(st.subject_only[0]),
                             "ci": [num(st.subject_only[1]), num(st.subject_only[2])]}}


def adjust_family(rows: list[dict], family: str) -> list[dict]:
    """Holm-adjusted p over every row of one family (in place) and the verdict from it (``higher_is_better``
    per row, default True); ``family`` names the family in each row."""
    adj = holm({str(i): (r["p"] if r["p"] is not None else float("nan")) for i, r in enumerate(rows)})
    for i, r in enumerate(rows):
        p = adj[str(i)]
        r["family"], r["p_holm"] = family, num(p)
        r["verdict"] = verdict_p(r["diff_mean"] if r["diff_mean"] is not None else float("nan"), p,
                                 higher_is_better=r.get("higher_is_better", True))
    return rows


def comparisons(long_rows: list[dict], n_boot: int, seed: int, metric: str = "dice",
                pairs: tuple[tuple[str, str, str], ...] = COMPARISONS, family: str = "clip") -> list[dict]:
    """Paired comparisons a - b of ``metric`` at the level of training runs, Holm-adjusted over the rows returned.

    ``dice``: Dice with the report prompt; ``prompt_gap``: report − irrelevant-prompt Dice (does a make the
    saliency more prompt-specific than b?); ``sal_auroc``: the report map's lesion AUROC (no discretisation). ``pairs``: (a, b, question), e.g. ``COMPARISONS`` or
    :func:`negdpo.study.variants.stage2_comparisons`; pairs whose rows did not both run are left out. Runs pair
    as :func:`align_runs` says. The study adjusts each whole family (both metrics) again with :func:`adjust_family`.
    """
    if metric not in METRICS:
        raise ValueError(f"metric '{metric}': one of {list(METRICS)}")
    per = {v: _per_key(long_rows, v, metric) for v in VARIANTS}
    out = []
    for a, b, question in pairs:
        if not per.get(a) or not per.get(b):
            continue
        out.append({"a": a, "b": b, "question": question, "metric": metric, "prompt": "report",
                    **compare(per[a], per[b], n_boot, seed)})
    return adjust_family(out, family)


def noise(long_rows: list[dict], pairs: tuple[tuple[str, str, str], ...], n_comparisons: int,
          target: float = 0.05, metric: str = "dice") -> list[dict]:
    """Per comparison a - b: the nested variance components (run, subject, image) of the paired difference of
    ``metric`` on this run's evaluation, and the minimum detectable effect (80 % power, alpha 0.05 / the
    family size) of this design and of more runs: the number of runs that would resolve ``target``
    (docs/method.md#minimum-detectable-effect). None with one run (run-to-run noise not measured); a level
    that is not identifiable (one image per subject) counts 0, its variance being in its parent's."""
    out = []
    for a, b, question in pairs:
        va, vb = _per_key(long_rows, a, metric), _per_key(long_rows, b, metric)
        vb = align_runs(va, vb)
        diff = {k: va[k] - vb[k] for k in sorted(va.keys() & vb.keys())}  # sorted: set order follows the hash seed
        if not diff:
            continue
        runs = {k[0] for k in diff}
        subjects = {k[1] for k in diff}
        images = len(diff) / max(1, len({k[:2] for k in diff}))
        comp = variance_components(diff, ("run", "subject", "image"))
        # a level that cannot be separated (NaN: one group per parent) has its variance in its parent's: 0 here
        usable = {k: (v if math.isfinite(v) else 0.0) for k, v in comp.items()}
        kw = dict(n_subjects=len(subjects), n_images=max(1, round(images)), n_comparisons=max(1, n_comparisons))
        ok = len(runs) > 1 and math.isfinite(comp["run"])
        mde = design_mde(usable, len(runs), **kw) if ok else float("nan")
        need = next((n for n in range(2, 101) if design_mde(usable, n, **kw) <= target), None) if ok else None
        out.append({"a": a, "b": b, "question": question, "metric": metric, "n_runs": len(runs),
                    "n_subjects": len(subjects), "components": {k: num(v) for k, v in comp.items()},
                    "mde": num(mde), "target": target, "runs_for_target": need})
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
                        "n_runs": len({r.get("run", "") for r in rows}),
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


def _gen_keyed(gen_rows: list[dict], method: str, modality: str, metric: str) -> Keyed:
    """{(run, subject, file): metric} of one method's paste-back rows (non-learned rows: ``paste_back`` None)."""
    return {(str(r.get("run", "")), str(r["subject_id"]), str(r["file"])): float(r[metric]) for r in gen_rows
            if r["method"] == method and r["paste_back"] in (True, None) and num(r.get(metric)) is not None
            and (modality == "all" or r["modality"] == modality)}


def broadcast_fixed(a: Keyed, b: Keyed) -> Keyed:
    """``b`` on ``a``'s runs: a row that trains nothing (run ``""``) pairs with every run of ``a``; else equal runs."""
    if {k[0] for k in b} != {""}:
        return align_runs(a, b)
    return {(ra, s, i): v for ra in sorted({k[0] for k in a}) for (_, s, i), v in b.items()}


def generator_comparisons(gen_rows: list[dict], n_boot: int, seed: int, metric: str = "inside_err",
                          pairs: tuple[tuple[str, str, str], ...] = GEN_COMPARISONS) -> list[dict]:
    """Paired comparisons of generator rows per modality (mri, us) at the level of generator training runs
    (seeds), Holm-adjusted over the family; lower ``metric`` is better (the verdict says *better* for a lower
    error of a)."""
    out = []
    for a, b, question in pairs:
        for modality in ("mri", "us"):
            va, vb = _gen_keyed(gen_rows, a, modality, metric), _gen_keyed(gen_rows, b, modality, metric)
            if not va or not vb:
                continue
            vb = broadcast_fixed(va, vb)
            out.append({"a": a, "b": b, "question": question, "metric": metric, "modality": modality,
                        "higher_is_better": False, **compare(va, vb, n_boot, seed)})
    return adjust_family(out, "generator")
