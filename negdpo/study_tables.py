"""The study's ``results.json`` contract, built from per-image rows, ``results.md`` rendered from it, the
per-image CSVs and the training-curve figure.

Inputs are *long* per-image tables written by :mod:`negdpo.study_eval`:

* segmentation: one row per (variant, seed, image, prompt) with ``dice``, ``subject_id`` and ``group``;
* generator: one row per (method, paste_back, image) with the repair metrics of
  :func:`negdpo.generator.evaluate.repair_metrics`, ``subject_id`` and ``modality``.

Every interval is a 95% percentile bootstrap (:mod:`negdpo.core.stats`, docs/method.md#statistics):
means over subjects for single rows, paired (image, seed) differences for the prompt gap and the
comparisons. The markdown is rendered from the contract alone, so the two never disagree.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from negdpo.core.stats import Stat, paired_diff_ci, subject_ci, verdict

CLIP_VARIANTS = ("base", "dhn_nce", "dpo_gen", "dpo_twin", "dpo_harmonic", "dpo_entropy", "stages")
CLIP_LABELS = {"base": "base (contrastive pre-training)", "dhn_nce": "DHN-NCE (baseline)",
               "dpo_gen": "CLIP-DPO, generated negatives", "dpo_twin": "CLIP-DPO, twin negatives (oracle)",
               "dpo_harmonic": "CLIP-DPO, harmonic-fill negatives (no generator)",
               "dpo_entropy": "CLIP-DPO + attention entropy", "stages": "two-stage OT"}
# rows beyond the CLIP variants (negdpo.study_stages): stage 2 (prompt-free, no prompt: report rows only) and VL-SAM
STAGE2_VARIANTS = ("pg_pseudo_base", "pg_pseudo_best", "pg_supervised", "vlsam")
ROW_LABELS = {**CLIP_LABELS, "pg_pseudo_base": "stage 2: prompt generator on the base chain's pseudo-labels",
              "pg_pseudo_best": "stage 2: prompt generator on a fine-tuned chain's pseudo-labels",
              "pg_supervised": "prompt generator on ground truth (supervised ceiling)",
              "vlsam": "VL-SAM (tiny VLM trained on the pool)",
              "base_reference": "base, reference saliency (eval_reference_saliency)"}
VARIANTS = (*CLIP_VARIANTS, "base_reference", *STAGE2_VARIANTS)
GEN_LABELS = {"identity": "positive itself (no repair)", "harmonic": "harmonic fill (classical)",
              "sft": "SFT only", "dpo": "DPO", "dpo_mi": "DPO + MI", "dpo_mi_sdpo": "DPO + MI + SDPO"}
PROMPTS = ("report", "word", "irrelevant")
GROUPS = ("mri_bright", "mri_dark", "us")
GROUP_LABELS = {"mri_bright": "bright MRI", "mri_dark": "dark MRI", "us": "ultrasound"}
# (a, b, what the difference a - b answers); only pairs whose variants both ran are reported
COMPARISONS = (("dhn_nce", "base", "DHN-NCE vs base"), ("dpo_gen", "dhn_nce", "CLIP-DPO vs DHN-NCE"),
               ("dpo_gen", "base", "CLIP-DPO vs base"), ("dpo_twin", "dpo_gen", "oracle (twin) vs generated negatives"),
               ("dpo_harmonic", "dpo_gen", "harmonic-fill vs generated negatives"),
               ("dpo_entropy", "dpo_gen", "attention entropy vs none"), ("stages", "dpo_gen", "two-stage OT vs none"))
MODALITIES = ("mri", "us", "all")


def stage2_comparisons(best: str) -> tuple[tuple[str, str, str], ...]:
    """Stage 2 vs the stage 1 it learned from, the supervised ceiling vs the zero-shot base, VL-SAM and the
    reference saliency vs the study's CLIP saliency (each on the base CLIP)."""
    return (("pg_pseudo_base", "base", "stage 2 vs stage 1 (base chain)"),
            ("pg_pseudo_best", best, f"stage 2 vs stage 1 ({best} chain)"),
            ("pg_supervised", "base", "supervised ceiling vs zero-shot base"),
            ("vlsam", "base", "VL-SAM vs the CLIP saliency (base CLIP)"),
            ("base_reference", "base", "reference saliency vs the study's (base CLIP)"))


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


# -- generator -------------------------------------------------------------------------------------
def gen_label(method: str) -> str:
    """Row label of a generator method; ``<variant>_noise`` = that variant sampled from pure noise."""
    base = method.removesuffix("_noise")
    label = GEN_LABELS.get(base, base)
    return f"{label}, from pure noise (strength 1)" if method.endswith("_noise") else label


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


# -- markdown --------------------------------------------------------------------------------------
def fmt(mean: float | None, ci: list | None = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    if not ci or ci[0] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def segmentation_md(rows: list[dict]) -> str:
    lines = ["| checkpoint / segmenter | prompt | n img | seeds | Dice | " + " | ".join(GROUP_LABELS[g] for g in GROUPS)
             + " | prompt gap (report − irrelevant) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        groups = " | ".join(fmt(r["dice_by_group"][g]) for g in GROUPS)
        gap = fmt(r["prompt_gap"], r["prompt_gap_ci"]) if r["prompt"] == "report" else ""
        gap = "— (prompt-free)" if r["variant"].startswith("pg_") else gap
        lines.append(f"| {ROW_LABELS[r['variant']]} | {r['prompt']} | {r['n_images']} | {r['n_seeds']} | "
                     f"{fmt(r['dice_mean'], r['dice_ci'])} | {groups} | {gap} |")
    return "\n".join(lines)


def comparisons_md(rows: list[dict]) -> str:
    if not rows:
        return "No comparison ran (each needs both of its variants)."
    lines = ["| comparison (a − b) | metric | pairs | mean difference [95% CI] | verdict for a |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        metric = {"dice": "Dice", "prompt_gap": "prompt gap"}[r["metric"]]
        lines.append(f"| {r['question']} (`{r['a']}` − `{r['b']}`) | {metric} | {r['n_pairs']} | "
                     f"{fmt(r['diff_mean'], r['ci'])} | {r['verdict']} |")
    return "\n".join(lines)


def generator_md(rows: list[dict]) -> str:
    lines = ["| generator | paste-back | modality | n img | inside-mask error vs twin ↓ | outside PSNR (dB) ↑ | "
             "outside MI (nats) ↑ | residual-lesion score ↓ | lesion-free rate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        paste = {None: "—", True: "yes", False: "no"}[r["paste_back"]]
        lines.append(f"| {gen_label(r['method'])} | {paste} | {r['modality']} | {r['n_images']} | "
                     f"{fmt(r['inside_err'], r['inside_err_ci'])} | {fmt(r['outside_psnr'], r['outside_psnr_ci'], 2)} | "
                     f"{fmt(r['outside_mi'])} | {fmt(r['residual_lesion'])} | "
                     f"{fmt(r['lesion_free_rate'], r.get('lesion_free_rate_ci'))} |")
    return "\n".join(lines)


def sampling_md(cfg: dict) -> str:
    """How the learned generators sampled (the config's ``gen_init`` / ``gen_strength``)."""
    init, strength = cfg.get("gen_init", "source"), cfg.get("gen_strength", 1.0)
    if strength >= 1:
        return "Learned generators sample from pure noise (strength 1). "
    start = "the positive itself" if init == "source" else "the positive with the mask harmonically filled (SDEdit)"
    return (f"Learned generators (and the pairs) start from {start}, noised to strength {strength}; the row "
            "*from pure noise* is the pairs' generator at strength 1. ")


def stage2_md(info: dict | None) -> str:
    """What the stage-2 and VL-SAM rows are, and what they cost (from ``results["stage2"]``)."""
    if not info or (not info.get("pg") and not info.get("vlsam")):
        return "Stage 2 (prompt generator) and VL-SAM rows: not run (`pg_steps: 0`, `vlm_steps: 0`)."
    lines = []
    if info.get("pg"):
        lines.append(
            f"**Stage 2** (`pg_*` rows, CLIP seed {info['seed']}): the MaskSAM-style prompt generator is trained on the "
            "train split and segments the test split **prompt-free** (no CLIP, no saliency, no prompt), so these rows "
            "have the `report` prompt only and no prompt gap. `pg_pseudo_*` train on the masks of a zero-shot chain run "
            "on the train images whose report says tumour (report as the prompt; healthy reports -> empty masks: the "
            "image-level label comes from the report, the lesion's extent never from ground truth); `pg_supervised` "
            f"trains on the ground-truth masks (the ceiling). `pg_pseudo_best` uses the `{info['pg_best_variant']}` "
            "chain, fixed in the config (`pg_best_variant`) before any test number was seen.")
        for variant, pl in (info.get("pseudo_labels") or {}).items():
            lines.append(f"- pseudo-labels of the `{variant}` chain: {pl.get('n_pseudo')} of {pl.get('n_images')} "
                         f"train images, Dice vs ground truth {fmt(pl.get('pseudo_dice_vs_gt'))}")
        for row, r in info["pg"].items():
            lines.append(f"- `{row}`: " + (r if isinstance(r, str) else
                         f"{r.get('train_images')} images, {r.get('n_targets')} targets, trained in "
                         f"{r.get('train_seconds')} s"))
    vl = info.get("vlsam")
    if vl:
        vlm = vl.get("vlm") or {}
        lines.append(
            f"\n**VL-SAM** (`vlsam`): the tiny Qwen2-VL preset taught to write the reports of split "
            f"`{vlm.get('split')}` ({vlm.get('steps')} steps, loss {fmt(vlm.get('loss_first'))} -> "
            f"{fmt(vlm.get('loss_last'))}); its regularised attention flow for the prompt's object word is the "
            f"saliency (without SAM: the same post-processing as the CLIP rows; with SAM: points from the map's peaks). "
            f"{fmt(vl.get('seconds_per_map'))} s per map ({vl.get('maps')} maps).")
    return "\n".join(lines)


def lesion_free_md(detector: dict | None) -> str:
    """The lesion-free column's note: which judge, trained on what, and how accurate it is on real scans."""
    if not detector:
        return "*Lesion-free rate*: not measured (no frozen residual-lesion detector: `judges: false` or no pool)."
    acc = detector.get("held_out_accuracy") or {}
    groups = ", ".join(f"{GROUP_LABELS.get(g, g)} {fmt(a.get('accuracy'))}" for g, a in acc.items() if g != "all")
    a = acc.get("all") or {}
    return ("*Lesion-free rate*: share of repairs the frozen residual-lesion detector (logistic regression on region "
            "features, fitted on the pre-training pool only, never used for pairs or training) calls lesion-free, "
            f"with its subject-bootstrap CI. Its accuracy on the held-out real positives vs their twins: "
            f"{fmt(a.get('accuracy'))} (sensitivity {fmt(a.get('sensitivity'))}, specificity "
            f"{fmt(a.get('specificity'))}; {groups}).")


def realism_md(rows: list[dict]) -> str:
    """Realism AUC per generator and paste setting (0.5 = indistinguishable from the real twins)."""
    if not rows:
        return "Realism AUC (real-vs-generated judge): not measured (`judges: false`, no pool, or `judge_pool_max: 0`)."
    lines = ["Realism AUC of a real-vs-generated classifier fitted per generator on its repairs of pool positives vs "
             "their twins, scored on the held-out repairs vs their twins (0.5 = indistinguishable, 1 = always told "
             "apart; subject-bootstrap CI):", "", "| generator | paste-back | pool / held-out images | AUC |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        paste = {None: "—", True: "yes", False: "no"}[r["paste_back"]]
        lines.append(f"| {gen_label(r['method'])} | {paste} | {r['n_pool']} / {r['n_held_out']} | "
                     f"{fmt(num(r['auc']), [num(v) for v in r['auc_ci']])} |")
    return "\n".join(lines)


def render_markdown(results: dict, figures: list[str], seconds: float) -> str:
    """``results.md`` from the contract (``results.json``) alone."""
    import yaml

    cfg = results["config"]
    psum = results.get("pairs") or {}
    seeds = results.get("seeds", [cfg["seed"]])
    twin_mi = results.get("twin_outside_mi") or [None, None, None]
    oracle = (f"**{fmt(results['oracle_box_dice'], results.get('oracle_box_dice_ci'))}** (ground-truth box → SAM "
              f"`{results.get('oracle_sam') or cfg['eval_sam']}`; the ceiling of the box-prompted chain)"
              if results.get("oracle_box_dice") is not None
              else "not measured (the study ran without SAM: `eval_sam: none`)")
    sam = results.get("sam_pretrain")
    if sam:
        oracle += (f". The tiny SAM was pre-trained as a promptable segmenter on the pre-training pool only "
                   f"({sam.get('steps')} steps, {sam.get('train_images')} pool images; held-out pool lesions: box "
                   f"Dice {fmt(num(sam.get('val_box_dice')))}, point Dice {fmt(num(sam.get('val_point_dice')))}); it is "
                   "the SAM of the chain, of this row and of the prompt-generator rows")
    area = cfg.get("phantoms_lesion_area")
    lines = [
        "# Phantom study", "",
        f"Preset `{results['preset']}`, seed {cfg['seed']}, CLIP seeds {seeds}, code `{results['code_version']}`. "
        f"Produced by `negdpo study --config configs/phantom_study.yaml --preset {results['preset']}` (this run: "
        f"{seconds:.0f} s including cached stages). Every number below is computed by that command from "
        "`results.json`; rerunning with the same seed reproduces them."
        + (" **Smoke preset: not for claims.**" if results["preset"] == "quick" else ""), "",
        f"Phantoms: {cfg['phantoms_n']} subjects x {cfg['phantoms_slices']} slices at {cfg['phantoms_size']} px "
        "(MRI-like + ultrasound-like, 25% healthy-only subjects, subject-level splits), lesion areas "
        + (f"{area[0]:.0%}–{area[1]:.0%} of the image" if area else "from the original radius law")
        + f"; pre-training pool: {cfg.get('phantoms_pretrain_n', 0)} further subjects (the base CLIP pre-trains on "
        f"split `{results.get('clip_pretrain_split', 'train')}`). Intervals are 95% percentile-bootstrap CIs "
        f"({cfg['bootstrap']} resamples): over subjects for single rows (each subject = the mean of its images and "
        "seeds), over (image, seed) pairs for paired differences.", "",
        "## Zero-shot segmentation of the test subjects", "",
        f"{results['n_test_positive']} test positives. Saliency `{cfg['eval_saliency']}` → k-means → largest "
        f"component → SAM `{cfg['eval_sam']}` (`none` = the coarse mask is the prediction). Prompts: `report` = the "
        f"scan's own report, `word` = \"{cfg.get('prompt_word')}\", `irrelevant` = \"{cfg.get('prompt_irrelevant')}\". "
        "The prompt gap (report − irrelevant, paired per image and seed) is what a prompt-specific saliency shows; "
        "a map that ignores the prompt has a gap of 0.", "",
        segmentation_md(results["segmentation"]), "",
        f"Oracle box: {oracle}.", "",
        stage2_md(results.get("stage2")), "",
        "## Comparisons (paired)", "",
        "Mean per-(image, seed) difference a − b with a 95% bootstrap CI; *better* / *worse* when the CI "
        "excludes 0, else *inconclusive*. *Dice*: with the report prompt; *prompt gap*: report − irrelevant-prompt "
        "Dice (a larger gap = a saliency that follows the prompt more).", "",
        comparisons_md(results["comparisons"]), "",
        "## Generator: tumour removal on held-out positives (val + test subjects)", "",
        "Each generator repaints the 2-px-dilated lesion mask of every held-out positive. *Paste-back* keeps the "
        f"source exactly outside that mask (soft seam of {cfg.get('gen_seam_px')} px inside it); the no-paste rows "
        f"show the model's own outside. {sampling_md(cfg)}*Inside-mask error vs twin*: mean |output − healthy twin| inside the lesion "
        "(0 = a perfect remover). *Outside PSNR / MI*: against the source outside the repaint mask (99 dB = "
        "identical). *Residual-lesion score*: 1 − the contrast judge of pair building (not independent of it). "
        + lesion_free_md(results.get("lesion_detector")), "",
        generator_md(results["generator"]), "",
        f"Outside-mask MI of the healthy twin itself against the source (the ceiling): {fmt(twin_mi[0], twin_mi[1:])}.",
        "",
        realism_md(results.get("realism") or []), "",
        "## Preference pairs", "",
        f"Built with `negdpo build-pairs` from the `{cfg['pairs_adapter']}` generator (sampled as above), "
        f"K = {cfg['pairs_k']} "
        f"candidates per positive, {cfg['pairs_steps']} sampling steps, judged with the first seed's base CLIP + "
        f"phantom judges. Rows per kind and split: `{json.dumps(psum.get('rows'))}`; dropped: "
        f"`{json.dumps(psum.get('dropped'))}`. Quality report: `pairs/report/report.md` under the work dir.", "",
        "## Figures", "",
    ]
    lines += [f"![{f}](figures/{f})" for f in figures]
    stage_s = results.get("stage_seconds") or {}
    if stage_s:
        lines += ["", "## Run time per stage", "",
                  f"Seconds each stage took when it was computed (cached stages keep their first time); total "
                  f"{sum(stage_s.values()) / 60:.1f} min from an empty work dir.", "",
                  "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {sec:.0f} |" for name, sec in stage_s.items()]
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


# -- CSV and figures -----------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_curves(logs: dict[str, Path], out: Path, keys: tuple[str, ...], title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, path in logs.items():
        if path.exists():
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            series[name] = recs
    if not series:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4))
    axes = np.atleast_1d(axes)
    colors = {name: f"C{i}" for i, name in enumerate(series)}  # one colour per run in every panel
    for ax, key in zip(axes, keys):
        for name, recs in series.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, color=colors[name], lw=1.2)
        if key == "loss" and all(v > 0 for recs in series.values() for r in recs if (v := r.get(key)) is not None):
            ax.set_yscale("log")  # SFT (MSE) and DPO losses differ by orders of magnitude
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
