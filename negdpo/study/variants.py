"""The study's row names, their labels and the questions it asks of them: each name is defined here once.

Row names are stable (they key cached stages, ``results.json`` and the CSVs); docs/method.md lists them.
"""

from __future__ import annotations

# -- generators ------------------------------------------------------------------------------------------------
GEN_VARIANTS = ("sft", "dpo", "dpo_mi", "dpo_mi_sdpo")  # the twin-supervised generators (oracle), training order
GEN_LABELS = {"identity": "positive itself (no repair)", "harmonic": "harmonic fill (classical)",
              "harmonic_vae": "harmonic fill through the autoencoder (no UNet)",
              "harmonic_untrained": "untrained UNet from the harmonic fill (no adapter)",
              "sft": "SFT on twins (oracle)", "dpo": "DPO (oracle)", "dpo_mi": "DPO + MI (oracle)",
              "dpo_mi_sdpo": "DPO + MI + SDPO (oracle)", "sft_healthy": "self-supervised SFT on healthy tissue (no twins)",
              "harmonic_vae_twinfree": "harmonic fill through the twin-free autoencoder (no UNet, no twins)"}
TWINFREE_VAE = "harmonic_vae_twinfree"  # the twin-free rows' baseline: their own autoencoder never saw a twin
# The twin-free generators (issue 23; negdpo.study.twinfree): ``sft_healthy``, then per chain (name: masked-MI
# regulariser on) the rounds ``<chain>_r1`` .. ``<chain>_r<R>`` of on-policy DPO judged by the training judges.
TWINFREE_CHAINS = {"dpo_onpolicy": False, "dpo_onpolicy_mi": True}
_CHAIN_LABELS = {"dpo_onpolicy": "on-policy DPO", "dpo_onpolicy_mi": "on-policy DPO + MI"}


def twinfree_rows(rounds: int) -> tuple[str, ...]:
    """The twin-free generator rows of ``rounds`` on-policy rounds, in training order."""
    return ("sft_healthy", *(f"{chain}_r{r}" for chain in TWINFREE_CHAINS for r in range(1, rounds + 1)))


def training_stage(row: str) -> str:
    """The generator stage (``gen_<stage>``) that trained a row: a round's row names its chain's stage."""
    chain, _, r = row.rpartition("_r")
    return chain if chain in TWINFREE_CHAINS and r.isdigit() else row


# (a, b, question) of the generator table, on the inside-mask error vs the twin (lower is better), per modality
GEN_COMPARISONS = (("dpo", "sft", "DPO vs SFT (oracle)"), ("dpo_mi", "dpo", "DPO + MI vs DPO (oracle)"),
                   ("dpo_mi_sdpo", "dpo_mi", "DPO + MI + SDPO vs DPO + MI (oracle)"),
                   *((v, "harmonic_vae", f"{GEN_LABELS[v]} vs the harmonic fill through the autoencoder")
                     for v in GEN_VARIANTS),
                   ("harmonic_untrained", "harmonic_vae", "untrained UNet from the fill vs the fill through the autoencoder"),
                   ("sft", "harmonic_untrained", "SFT (oracle) vs the untrained UNet (same sampling)"))


def gen_comparisons(rounds: int) -> tuple[tuple[str, str, str], ...]:
    """:data:`GEN_COMPARISONS` and, with ``rounds`` > 0, the twin-free questions: does the last round of on-policy
    DPO beat self-supervised SFT, does each twin-free row beat the fill through its own (twin-free) autoencoder,
    does MI help?"""
    if rounds <= 0:
        return GEN_COMPARISONS
    last, last_mi = f"dpo_onpolicy_r{rounds}", f"dpo_onpolicy_mi_r{rounds}"
    return (*GEN_COMPARISONS, (last, "sft_healthy", "twin-free: on-policy DPO vs self-supervised SFT"),
            *((v, TWINFREE_VAE, f"{gen_label(v)} vs the harmonic fill through the twin-free autoencoder")
              for v in twinfree_rows(rounds)),
            (last_mi, last, "twin-free: on-policy DPO + MI vs on-policy DPO"))

# -- CLIP checkpoints ------------------------------------------------------------------------------------------
# The data-matched design (issue 22): loss x negatives, {DHN-NCE, CLIP-DPO} x {twin, generated, harmonic}, plus
# MedCLIP-SAMv2's own DHN-NCE setting (positives and ordinary healthy scans with their reports, in-batch
# negatives, no counterfactual image) and two CLIP-DPO extensions. Old names keep their meaning: ``dhn_nce`` is
# DHN-NCE on twins, ``dpo_gen`` CLIP-DPO on generated negatives.
# ``twinfree``: pairs of the twin-free generator judged without twins (issue 23): those rows run with
# ``twinfree_rows`` only (TWINFREE_CLIP).
DESIGN = {("dhn_nce", "twin"): "dhn_nce", ("dhn_nce", "gen"): "dhn_nce_gen", ("dhn_nce", "harmonic"): "dhn_nce_harmonic",
          ("dhn_nce", "twinfree"): "dhn_nce_twinfree",
          ("dpo", "twin"): "dpo_twin", ("dpo", "gen"): "dpo_gen", ("dpo", "harmonic"): "dpo_harmonic",
          ("dpo", "twinfree"): "dpo_twinfree"}
NEGATIVES = {"twin": "twin", "gen": "generated", "harmonic": "harmonic-fill", "twinfree": "twin-free generated"}
CLIP_VARIANTS = ("base", "dhn_nce_faithful", "dhn_nce", "dhn_nce_gen", "dhn_nce_harmonic", "dhn_nce_twinfree", "dpo_twin",
                 "dpo_gen", "dpo_harmonic", "dpo_twinfree", "dpo_entropy", "stages")
TWINFREE_CLIP = ("dhn_nce_twinfree", "dpo_twinfree")
FINETUNED = CLIP_VARIANTS[1:]  # trained from a base CLIP: one run per (base seed, fine-tune seed)
CLIP_LABELS = {"base": "base (contrastive pre-training)",
               "dhn_nce_faithful": "DHN-NCE, MedCLIP-SAMv2 setting (in-batch negatives)",
               "dhn_nce": "DHN-NCE, twin negatives", "dhn_nce_gen": "DHN-NCE, generated negatives",
               "dhn_nce_harmonic": "DHN-NCE, harmonic-fill negatives",
               "dhn_nce_twinfree": "DHN-NCE, twin-free generated negatives",
               "dpo_twinfree": "CLIP-DPO, twin-free generated negatives (no twins anywhere)",
               "dpo_gen": "CLIP-DPO, generated negatives", "dpo_twin": "CLIP-DPO, twin negatives (oracle)",
               "dpo_harmonic": "CLIP-DPO, harmonic-fill negatives (no generator)",
               "dpo_entropy": "CLIP-DPO + attention entropy", "stages": "two-stage OT"}
# What each row's training saw beyond images and reports: the train split's lesion masks (directly, or through the
# generator / the fill that made its negatives) and the healthy twins (directly, or through the generator's DPO,
# whose preferred repairs are the twins). The base pre-trains on the pool's positives and twins.
SUPERVISION = {"base": "pool twins", "dhn_nce_faithful": "none", "dhn_nce": "twins",
               "dhn_nce_gen": "masks + twins (generator)", "dhn_nce_harmonic": "masks",
               "dpo_twin": "twins", "dpo_gen": "masks + twins (generator)", "dpo_harmonic": "masks",
               "dhn_nce_twinfree": "masks (no twins)", "dpo_twinfree": "masks (no twins)",
               "dpo_entropy": "masks + twins (generator)", "stages": "masks + twins (generator)",
               "base_reference": "pool twins", "pg_pseudo_base": "pseudo-labels", "pg_pseudo_best": "pseudo-labels",
               "pg_supervised": "masks", "vlsam": "pool reports"}

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

# (a, b, what the difference a - b answers); only pairs whose variants both ran are reported. Families, fixed before
# any test evaluation, each Holm-adjusted (negdpo.study.results.families, negdpo.study.tables.adjust_family):
# ``clip`` -- the primary question, the data-matched design on Dice; ``clip_twinfree`` -- the twin-free CLIP rows on
# Dice; ``clip_secondary`` -- both on the prompt gap, and fine-tune vs base and the CLIP-DPO extensions on Dice and
# prompt gap; ``clip_saliency`` -- all of them on the map's lesion AUROC.
DESIGN_COMPARISONS = (
    # loss at fixed data
    *((DESIGN["dpo", d], DESIGN["dhn_nce", d], f"CLIP-DPO vs DHN-NCE on {NEGATIVES[d]} negatives")
      for d in ("twin", "gen", "harmonic")),
    # data at fixed loss
    *((DESIGN[loss, "gen"], DESIGN[loss, other], f"{name}: generated vs {NEGATIVES[other]} negatives")
      for loss, name in (("dpo", "CLIP-DPO"), ("dhn_nce", "DHN-NCE")) for other in ("twin", "harmonic")),
    # each against MedCLIP-SAMv2's own setting
    *((v, "dhn_nce_faithful", f"{CLIP_LABELS[v]} vs MedCLIP-SAMv2's DHN-NCE")
      for (_, neg), v in DESIGN.items() if neg != "twinfree"))
# The twin-free CLIP rows (issue 23) ask their own question, in their own family ``clip_twinfree`` (fixed before
# their first test evaluation): they leave the primary family's Holm factor at the size of issue 22's design (13).
TWINFREE_COMPARISONS = (
    (DESIGN["dpo", "twinfree"], DESIGN["dhn_nce", "twinfree"], "CLIP-DPO vs DHN-NCE on twin-free generated negatives"),
    # without twins anywhere vs the generator trained on twins and vs the no-generator control
    *(("dpo_twinfree", DESIGN["dpo", other], f"CLIP-DPO: twin-free generated vs {NEGATIVES[other]} negatives")
      for other in ("gen", "harmonic")),
    *((v, "dhn_nce_faithful", f"{CLIP_LABELS[v]} vs MedCLIP-SAMv2's DHN-NCE") for v in TWINFREE_CLIP))
OTHER_COMPARISONS = (
    # fine-tune vs base
    *((v, "base", f"{CLIP_LABELS[v]} vs base") for v in ("dhn_nce_faithful", *DESIGN.values())),
    ("dpo_entropy", "dpo_gen", "attention entropy vs none"), ("stages", "dpo_gen", "two-stage OT vs none"))
COMPARISONS = DESIGN_COMPARISONS + TWINFREE_COMPARISONS + OTHER_COMPARISONS


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
    chain, _, r = base.rpartition("_r")
    label = (f"{_CHAIN_LABELS[chain]}, round {r} (no twins)" if chain in TWINFREE_CHAINS and r.isdigit()
             else GEN_LABELS.get(base, base))
    return f"{label}, from pure noise (strength 1)" if method.endswith("_noise") else label
