"""``results.md``, rendered from the ``results.json`` contract alone (so the two never disagree)."""

from __future__ import annotations

import json

import yaml

from negdpo.study.tables import num
from negdpo.study.variants import GROUP_LABELS, GROUPS, ROW_LABELS, gen_label


def fmt(mean: float | None, ci: list | None = None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    if not ci or ci[0] is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def segmentation_md(rows: list[dict]) -> str:
    lines = ["| checkpoint / segmenter (`row`) | supervision beyond reports | prompt | n img | runs | Dice | "
             + " | ".join(GROUP_LABELS[g] for g in GROUPS) + " | prompt gap (report − irrelevant) | lesion AUROC of "
             "the map |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        n = r.get("n_by_group") or {}
        groups = " | ".join(fmt(r["dice_by_group"][g]) + (f" (n {n[g]})" if g in n else "") for g in GROUPS)
        gap = fmt(r["prompt_gap"], r["prompt_gap_ci"]) if r["prompt"] == "report" else ""
        gap = "— (prompt-free)" if r["variant"].startswith("pg_") else gap
        lines.append(f"| {ROW_LABELS[r['variant']]} (`{r['variant']}`) | {r.get('supervision') or ''} | {r['prompt']} | "
                     f"{r['n_images']} | {r.get('n_runs', r['n_seeds'])} | "
                     f"{fmt(r['dice_mean'], r['dice_ci'])} | {groups} | {gap} | "
                     f"{fmt(r.get('sal_auroc'), r.get('sal_auroc_ci'))} |")
    return "\n".join(lines)


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_cells(r: dict) -> str:
    """The bootstrap p, the t test's p over runs and the Holm-adjusted p of the larger (the verdict's) as cells."""
    return (f"{fmt_p(r.get('p_boot', r.get('p')))} | {fmt_p((r.get('t_check') or {}).get('p'))} | "
            f"{fmt_p(r.get('p_holm'))}")


def comparisons_md(rows: list[dict]) -> str:
    """One line per comparison: per-run differences, the run-level CI, raw and Holm p, the verdict, the unit,
    and the subject-only CI (runs fixed) as the secondary number."""
    if not rows:
        return "No comparison ran (each needs both of its variants)."
    lines = ["| family | comparison (a − b) | metric | runs × subjects | per-run differences | mean difference "
             "[95% CI, runs × subjects] | p bootstrap | p t (runs) | Holm p | verdict for a | secondary: subject-only CI |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    units = []
    for r in rows:
        metric = {"dice": "Dice", "prompt_gap": "prompt gap", "sal_auroc": "lesion AUROC of the map"}[r["metric"]]
        per_run = ", ".join(f"{k}: {v:+.3f}" for k, v in (r.get("per_run") or {}).items() if v is not None)
        sub = r.get("subject_only") or {}
        units.append(r.get("unit"))
        lines.append(f"| {r.get('family', '')} | {r['question']} (`{r['a']}` − `{r['b']}`) | {metric} | "
                     f"{r.get('n_runs')} × {r.get('n_subjects')} | {per_run} | {fmt(r['diff_mean'], r['ci'])} | "
                     f"{p_cells(r)} | {r['verdict']} | {fmt(sub.get('diff_mean'), sub.get('ci'))} |")
    lines += ["", "Unit of the CIs and verdicts: " + "; ".join(sorted({u for u in units if u})) + ". Holm p: over "
              "the family, of the larger of the two p-values (docs/method.md#statistics)."]
    return "\n".join(lines)


def twinfree_md(cfg: dict) -> str:
    """What the *(oracle)* and *(no twins)* generator rows saw in training (empty without ``twinfree_rows``)."""
    if not cfg.get("twinfree_rows"):
        return "Rows marked *(oracle)* learn from the healthy twins (SFT target, DPO's chosen image)."
    return ("Rows marked *(oracle)* learn from the healthy twins (SFT target, DPO's chosen image). Rows marked *(no "
            "twins)* never read a twin nor a val/test scan in training (docs/method.md#the-twin-free-generator): an "
            "autoencoder adapted without twins, self-supervised SFT on healthy tissue "
            f"({cfg.get('twinfree_sft_steps')} steps, `sft_healthy`), then {cfg.get('twinfree_rounds')} on-policy "
            f"round(s) of Diffusion-DPO ({cfg.get('twinfree_candidates')} candidates per training positive judged by "
            f"the training judges, {cfg.get('twinfree_dpo_steps')} steps per round) without and with the masked-MI "
            "regulariser (`dpo_onpolicy_r<r>`, `dpo_onpolicy_mi_r<r>`). The twins score them here only.")


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


def generator_comparisons_md(rows: list[dict]) -> str:
    """The generator table's paired comparisons (inside-mask error, lower is better), at the level of generator
    training runs."""
    if not rows:
        return "No generator comparison ran."
    lines = ["| comparison (a − b) | modality | runs × subjects | per-run differences | mean difference [95% CI] | "
             "p bootstrap | p t (runs) | Holm p | verdict for a | secondary: subject-only CI |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per_run = ", ".join(f"{k or 'fixed'}: {v:+.3f}" for k, v in (r.get("per_run") or {}).items() if v is not None)
        sub = r.get("subject_only") or {}
        lines.append(f"| {r['question']} (`{r['a']}` − `{r['b']}`) | {r['modality']} | {r['n_runs']} × "
                     f"{r['n_subjects']} | {per_run} | {fmt(r['diff_mean'], r['ci'])} | {p_cells(r)} | "
                     f"{r['verdict']} | {fmt(sub.get('diff_mean'), sub.get('ci'))} |")
    return "\n".join(lines)


def saliency_md(rows: list[dict]) -> str:
    """Lesion AUROC of the raw map and its partial r given local brightness, per row, prompt and lesion group."""
    if not rows:
        return "Not measured (the evaluation wrote no saliency scores)."
    lines = ["| row | prompt | group | n img | lesion AUROC | partial r given brightness |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['prompt']} | {GROUP_LABELS.get(r['group'], r['group'])} | "
                     f"{r['n_images']} | {fmt(r['sal_auroc'], r['sal_auroc_ci'])} | "
                     f"{fmt(r['sal_partial_r'], r['sal_partial_r_ci'])} |")
    return "\n".join(lines)


def noise_md(rows: list[dict]) -> str:
    """Variance components of each comparison's paired Dice difference and the minimum detectable effect."""
    if not rows:
        return "Not estimated."
    lines = ["| comparison (a − b) | runs × subjects | SD run / subject / image | MDE of this design | runs to resolve "
             "the target |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        sd = " / ".join("n/a" if v is None else f"{v ** 0.5:.3f}" for v in r["components"].values())
        need = r["runs_for_target"] if r["runs_for_target"] is not None else "not within 100"
        lines.append(f"| `{r['a']}` − `{r['b']}` | {r['n_runs']} × {r['n_subjects']} | {sd} | {fmt(r['mde'])} | "
                     f"{need} (target {r['target']}) |")
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


def protocol_md(proto: dict | None) -> str:
    """Which split each choice was made on, and which splits each phase of the run opened."""
    if not proto:
        return "Not recorded."
    unrecorded = proto.get("reads_unrecorded") or []
    lines = [f"Only the final evaluations (the generator table and the segmentation evaluation) read the "
             f"`{proto['locked_split']}` split: the selection phase (training runs, pairs, SAM pre-training, "
             "pseudo-labels) ran with it locked (`negdpo.core.split_lock`: opening one of its files fails the run). "
             "Files opened per split, per phase (every stage's own count, kept in its stamp, so a rerun from the "
             "cache shows the same): "
             + "; ".join(f"{phase}: {json.dumps(reads)}" for phase, reads in (proto.get("reads") or {}).items())
             + "." + (f" Not counted: {len(unrecorded)} stages cached before stamps kept their reads "
                      f"({', '.join(unrecorded[:5])}{', ...' if len(unrecorded) > 5 else ''})." if unrecorded else ""),
             "", "| choice | value | chosen on |", "| --- | --- | --- |"]
    for name, c in proto["choices"].items():
        lines.append(f"| {name} | `{json.dumps(c['value'])}` | {c['chosen_on']} |")
    return "\n".join(lines)


def render_markdown(results: dict, figures: list[str], seconds: float) -> str:
    """``results.md`` from the contract (``results.json``) alone."""
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
        "**Saliency diagnostics** (the raw map, before k-means/SAM; docs/method.md#saliency-metrics): lesion AUROC "
        "(0.5 = no better than chance, < 0.5 = points away) and the partial correlation of the map with the "
        "lesion mask given local brightness (> 0: lesion-specific beyond a brightness prior), for the report and "
        "the irrelevant prompt, per lesion group (subject-bootstrap CIs).", "",
        saliency_md(results.get("saliency_diagnostics") or []), "",
        stage2_md(results.get("stage2")), "",
        "## Comparisons (paired, at the level of training runs)", "",
        "Difference a − b: per training run (`<base seed>/<fine-tune seed>`; a base CLIP or a stage-2 row: "
        "`<seed>`), the mean over subjects of each subject's mean image difference, then the mean over runs. "
        "The 95% CI and the p-value come from a hierarchical bootstrap that resamples training runs and the "
        "test subjects (one subject draw shared by the drawn runs: every run is scored on the same subjects; "
        "docs/method.md#statistics); p is adjusted by Holm over each family, fixed before the test split was read (`clip`, the primary "
        "question: the data-matched design -- loss at fixed data, data at fixed loss, each against MedCLIP-SAMv2's "
        "DHN-NCE -- on Dice; `clip_twinfree`: the twin-free CLIP rows' comparisons on Dice; `clip_secondary`: both "
        "on the prompt gap, and fine-tune vs base and the CLIP-DPO extensions on Dice and prompt gap; `clip_saliency`: every CLIP comparison on the report map's lesion AUROC, a continuous "
        "score without k-means/SAM noise; `stage2`: the stage-2 and reference rows) and the verdict "
        "is *better* / *worse* when the Holm p < 0.05, else *inconclusive*. With one run the CI is over "
        "subjects only and the unit says so. The subject-only CI (runs fixed: how sure we are about these "
        "trained checkpoints, not about the method) is a secondary number. *Dice*: with the report prompt; "
        "*prompt gap*: report − irrelevant-prompt Dice (a larger gap = a saliency that follows the prompt more).",
        "",
        comparisons_md(results["comparisons"]), "",
        "**Noise and power** (Dice, report prompt): nested variance components of each paired difference (training "
        "run, subject within run, image within subject; `negdpo.core.stats.variance_components`, on this run's "
        "test evaluation; the validation estimates that chose the design: results/tuning_val/README.md) of the "
        "`clip` family's comparisons and the minimum detectable effect at 80 % power "
        "with alpha 0.05 / the `clip` family size (`design_mde`); NaN / n/a with one run.", "",
        noise_md(results.get("noise") or []), "",
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
        f"Paired comparisons of the inside-mask error (paste-back rows; lower is better, so *better* = a lower "
        f"error), per modality, at the level of generator training runs (seeds {results.get('generator_seeds')}; "
        "a row that trains nothing pairs with every run), Holm over the family (`generator`): "
        "`harmonic_vae` is the harmonic fill through the generator's autoencoder (what the latent space alone "
        "gives), `harmonic_untrained` the learned rows' sampling with no adapter.", "",
        twinfree_md(cfg), "",
        generator_comparisons_md(results.get("generator_comparisons") or []), "",
        realism_md(results.get("realism") or []), "",
        "## Preference pairs", "",
        f"Built with `negdpo build-pairs` from the `{cfg['pairs_adapter']}` generator (sampled as above), "
        f"K = {cfg['pairs_k']} "
        f"candidates per positive, {cfg['pairs_steps']} sampling steps, judged with the first seed's base CLIP + "
        f"phantom judges. Rows per kind and split: `{json.dumps(psum.get('rows'))}`; dropped: "
        f"`{json.dumps(psum.get('dropped'))}`. Quality report: `pairs/report/report.md` under the work dir.", "",
        "## Protocol: where each choice was made", "",
        protocol_md(results.get("protocol")), "",
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
