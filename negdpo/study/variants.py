"""The study's row names, their labels and the questions it asks of them: each name is defined here once.

Row names are stable (they key cached stages, ``results.json`` and the CSVs); docs/method.md lists them.
"""

from __future__ import annotations

# -- generators ------------------------------------------------------------------------------------------------
GEN_VARIANTS = ("sft", "dpo", "dpo_mi", "dpo_mi_sdpo")  # the learned generators, in training order
GEN_LABELS = {"identity": "positive itself (no repair)", "harmonic": "harmonic fill (classical)",
              "sft": "SFT only", "dpo": "DPO", "dpo_mi": "DPO + MI", "dpo_mi_sdpo": "DPO + MI + SDPO"}

# -- CLIP checkpoints ------------------------------------------------------------------------------------------
CLIP_VARIANTS = ("base", "dhn_nce", "dpo_gen", "dpo_twin", "dpo_harmonic", "dpo_entropy", "stages")
CLIP_LABELS = {"base": "base (contrastive pre-training)", "dhn_nce": "DHN-NCE (baseline)",
               "dpo_gen": "CLIP-DPO, generated negatives", "dpo_twin": "CLIP-DPO, twin negatives (oracle)",
               "dpo_harmonic": "CLIP-DPO, harmonic-fill negatives (no generator)",
               "dpo_entropy": "CLIP-DPO + attention entropy", "stages": "two-stage OT"}

# -- segmentation rows beyond the CLIP chains: stage 2 (prompt-free: report rows only) and VL-SAM ---------------
PG_ROWS = ("pg_pseudo_base", "pg_pseudo_best", "pg_supervised")
STAGE2_VARIANTS = (*PG_ROWS, "vlsam")
ROW_LABELS = {**CLIP_LABELS, "pg_pseudo_base": "stage 2: prompt generator on the base chain's pseudo-labels",
              "pg_pseudo_best": "stage 2: prompt generator on a fine-tuned chain's pseudo-labels",
              "pg_supervised": "prompt generator on ground truth (supervised ceiling)",
              "vlsam": "VL-SAM (tiny VLM trained on the pool)",
              "base_reference": "base, reference saliency (eval_reference_saliency)"}
VARIANTS = (*CLIP_VARIANTS, "base_reference", *STAGE2_VARIANTS)  # every segmentation row, in table order

PROMPTS = ("report", "word", "irrelevant")
GROUPS = ("mri_bright", "mri_dark", "us")
GROUP_LABELS = {"mri_bright": "bright MRI", "mri_dark": "dark MRI", "us": "ultrasound"}
MODALITIES = ("mri", "us", "all")

# (a, b, what the difference a - b answers); only pairs whose variants both ran are reported
COMPARISONS = (("dhn_nce", "base", "DHN-NCE vs base"), ("dpo_gen", "dhn_nce", "CLIP-DPO vs DHN-NCE"),
               ("dpo_gen", "base", "CLIP-DPO vs base"), ("dpo_twin", "dpo_gen", "oracle (twin) vs generated negatives"),
               ("dpo_harmonic", "dpo_gen", "harmonic-fill vs generated negatives"),
               ("dpo_entropy", "dpo_gen", "attention entropy vs none"), ("stages", "dpo_gen", "two-stage OT vs none"))


def stage2_comparisons(best: str) -> tuple[tuple[str, str, str], ...]:
    """Stage 2 vs the stage 1 it learned from, the supervised ceiling vs the zero-shot base, VL-SAM and the
    reference saliency vs the study's CLIP saliency (each on the base CLIP)."""
    return (("pg_pseudo_base", "base", "stage 2 vs stage 1 (base chain)"),
            ("pg_pseudo_best", best, f"stage 2 vs stage 1 ({best} chain)"),
            ("pg_supervised", "base", "supervised ceiling vs zero-shot base"),
            ("vlsam", "base", "VL-SAM vs the CLIP saliency (base CLIP)"),
            ("base_reference", "base", "reference saliency vs the study's (base CLIP)"))


def gen_label(method: str) -> str:
    """Row label of a generator method; ``<variant>_noise`` = that variant sampled from pure noise."""
    base = method.removesuffix("_noise")
    label = GEN_LABELS.get(base, base)
    return f"{label}, from pure noise (strength 1)" if method.endswith("_noise") else label
