"""The study's settings (:class:`StudyConfig`, filled by the presets of configs/phantom_study.yaml) and their loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from negdpo.core.config import (
    bundled_config,
    check,
    check_finite_positive,
    check_mapping,
    check_positive,
    parse_config,
)
from negdpo.core.fill import INITS
from negdpo.study.protocol import CHOICES
from negdpo.study.variants import CLIP_VARIANTS, GEN_VARIANTS, PG_ROWS


@dataclass
class StudyConfig:
    """Settings of one study; the presets in configs/phantom_study.yaml fill these."""

    preset: str = field(
        default="quick", metadata={"help": "preset of the config's presets: section (quick | medium | full in configs/phantom_study.yaml)"})
    out: str = field(
        default="results/phantom_study", metadata={"help": "results folder: results.json, results.md, CSVs and figures"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the results in out of a study with other settings (a rerun with the "
                                         "same settings replaces its own results without it)"})
    work_dir: str = field(
        default="outputs/phantom_study", metadata={"help": "cache of every stage's outputs (reused by a rerun with the same settings)"})
    seed: int = field(
        default=0, metadata={"help": "base seed of every stage (seeds of repeated runs count up from it)"})
    device: str = field(
        default="auto", metadata={"help": "torch device: auto (cuda when available) | cpu | cuda[:N]"})
    threads: int = field(
        default=0, metadata={"help": "torch intra-op threads (0 = torch default; 1 is much faster on a shared 2-core CPU)"})
    workers: int = field(
        default=1, metadata={"help": "processes for independent CLIP stages (base per seed, fine-tunes): same numbers, less wall time"})
    # phantoms
    phantoms_n: int = field(default=40, metadata={"help": "phantom subjects of the train/val/test splits"})
    phantoms_size: int = field(default=64, metadata={"help": "phantom image side in px"})
    phantoms_slices: int = field(default=2, metadata={"help": "images per phantom subject"})
    phantoms_pretrain_n: int = field(
        default=0, metadata={"help": "subjects of the disjoint pre-training pool (0: the base CLIP pre-trains on train)"})
    phantoms_lesion_area: list[float] | None = field(
        default=None, metadata={"help": "[lo, hi] lesion area as a share of the image (null = the original radius law)"})
    # which variants to run (a reduced study runs a subset; the tables show what ran)
    gen_variants: list[str] = field(
        default_factory=lambda: list(GEN_VARIANTS), metadata={"help": "learned generators to train (negdpo/study/variants.py GEN_VARIANTS); the tables show what ran"})
    clip_variants: list[str] = field(
        default_factory=lambda: list(CLIP_VARIANTS), metadata={"help": "CLIP rows to train (negdpo/study/variants.py CLIP_VARIANTS); the tables show what ran"})
    # generator (tiny or a real SD-inpainting id/folder)
    gen_model: str = field(
        default="tiny", metadata={"help": "inpainting generator: tiny | hub id | diffusers folder"})
    gen_autoencoder_steps: int = field(
        default=0, metadata={"help": "> 0: adapt the generator's VAE to the phantoms for this many steps first (0 = off)"})
    gen_autoencoder_lr: float = field(default=1e-3, metadata={"help": "learning rate of that VAE adaptation"})
    gen_sft_steps: int = field(
        default=60, metadata={"help": "SFT steps of the generator (the sft row and every DPO row's start)"})
    gen_dpo_steps: int = field(default=60, metadata={"help": "DPO steps of each DPO generator row"})
    gen_batch: int = field(default=4, metadata={"help": "generator training batch size"})
    gen_lr: float = field(default=1e-3, metadata={"help": "generator learning rate (SFT and DPO)"})
    gen_beta: float = field(default=5000.0, metadata={"help": "Diffusion-DPO beta, convention WITH the 1/2"})
    gen_mi_weight: float = field(default=0.1, metadata={"help": "masked-MI weight of the dpo_mi rows"})
    gen_fidelity_weight: float = field(
        default=0.01, metadata={"help": "outside-mask fidelity weight of the dpo_mi rows"})
    gen_sdpo_mu: float = field(default=0.9, metadata={"help": "SDPO safeguard mu of the dpo_mi_sdpo row"})
    gen_sample_steps: int = field(
        default=20, metadata={"help": "sampling steps of the learned generators (table rows and pairs)"})
    gen_seam_px: float = field(
        default=2.0, metadata={"help": "soft seam of the paste-back rows, px inside the repaint mask"})
    gen_init: str = field(
        default="source", metadata={"help": "what the learned generators' sampling (table rows and pairs) starts from: source | harmonic"})
    gen_strength: float = field(
        default=1.0, metadata={"help": "noise strength of that start (1 = pure noise)"})
    gen_extra: dict = field(
        default_factory=dict, metadata={"help": "GenTrainConfig overrides of every generator run (mapping)"})
    gen_seeds: int = field(
        default=1, metadata={"help": "generator training seeds seed, seed + 1, ...: the generator comparisons resample them"})
    gen_noise_row: bool = field(
        default=True, metadata={"help": "with gen_strength < 1, also score the pairs' generator from pure noise "
                                        "(row <pairs_adapter>_noise; no comparison uses it)"})
    gen_isolation_rows: bool = field(
        default=True, metadata={"help": "add the rows harmonic_vae (fill through the autoencoder) and harmonic_untrained (no adapter)"})
    # pairs
    pairs_k: int = field(default=2, metadata={"help": "build-pairs candidates per positive"})
    pairs_steps: int = field(default=10, metadata={"help": "build-pairs sampling steps per candidate"})
    pairs_adapter: str = field(
        default="dpo_mi_sdpo", metadata={"help": "learned generator whose samples make the CLIP pairs"})
    pairs_extra: dict = field(
        default_factory=dict, metadata={"help": "BuildConfig overrides of the pair build (mapping)"})
    # CLIP
    clip_model: str = field(
        default="tiny", metadata={"help": "CLIP: tiny | hf-hub:<id> | local-dir:<folder>"})
    clip_pretrain_steps: int = field(
        default=150, metadata={"help": "contrastive pre-training steps of the base CLIP"})
    clip_finetune_steps: int = field(default=60, metadata={"help": "steps of each fine-tuned CLIP row"})
    clip_batch: int = field(default=8, metadata={"help": "CLIP training batch size"})
    clip_pretrain_lr: float = field(
        default=5e-4, metadata={"help": "learning rate of the base CLIP's pre-training"})
    clip_finetune_lr: float = field(default=5e-5, metadata={"help": "learning rate of the CLIP fine-tunes"})
    clip_seeds: int = field(
        default=1, metadata={"help": "every CLIP variant (base included) is trained with seeds seed, seed+1, ..."})
    clip_finetune_seeds: int = field(
        default=1, metadata={"help": "fine-tunes per base seed s: seeds s, s + 1000, s + 2000, ... (run \"s/<ft seed>\")"})
    clip_extra: dict = field(
        default_factory=dict, metadata={"help": "ClipTrainConfig overrides of every CLIP run (mapping)"})
    # segmentation
    eval_saliency: str = field(
        default="m2ib", metadata={"help": "saliency of the evaluation: m2ib | surgery | vlsam | oracle"})
    eval_sam: str = field(
        default="none", metadata={"help": "SAM of the evaluation: none | tiny (pre-trained on the pool when sam_pretrain_steps > 0) | vit_b | ..."})
    eval_extra: dict = field(
        default_factory=dict, metadata={"help": "EvalConfig overrides of every evaluation (mapping; prompts are the study's)"})
    eval_reference_saliency: str = field(
        default="", metadata={"help": "e.g. m2ib: the base CLIPs also through this saliency (row base_reference; empty = off)"})
    eval_reference_extra: dict = field(
        default_factory=dict, metadata={"help": "EvalConfig overrides of that reference evaluation (mapping)"})
    prompt_word: str = field(
        default="tumor", metadata={"help": "the one-word prompt of the prompt-sensitivity rows"})
    eval_word: bool = field(
        default=True, metadata={"help": "also evaluate every checkpoint with the one-word prompt (prompt-sensitivity "
                                        "rows; no comparison family uses them)"})
    prompt_irrelevant: str = field(
        default="a photo of a cat sitting on a chair", metadata={"help": "the irrelevant prompt of the control rows"})
    bootstrap: int = field(
        default=2000, metadata={"help": "bootstrap resamples of every confidence interval and p value"})
    # stage 2 (negdpo.segmentation.prompt_free, prompt-free, on the first seed's chains) and VL-SAM rows
    pg_steps: int = field(
        default=0, metadata={"help": "training steps of each stage-2 (prompt-free) row (0 = no pg_* rows)"})
    pg_lr: float = field(default=1e-2, metadata={"help": "stage-2 (prompt-free) learning rate"})
    pg_batch: int = field(default=2, metadata={"help": "stage-2 (prompt-free) batch size"})
    pg_rows: list[str] = field(
        default_factory=lambda: list(PG_ROWS), metadata={"help": "stage-2 rows to run (negdpo/study/variants.py PG_ROWS)"})
    pg_best_variant: str = field(
        default="dpo_gen", metadata={"help": "the fine-tuned chain of pg_pseudo_best, fixed in advance (no peek at test)"})
    pg_extra: dict = field(
        default_factory=dict, metadata={"help": "SegTrainConfig overrides of the stage-2 rows (mapping)"})
    vlm_steps: int = field(
        default=0, metadata={"help": "report-generation steps of the tiny VLM on the pre-training pool (0 = no vlsam row)"})
    vlm_lr: float = field(default=2e-3, metadata={"help": "VLM learning rate"})
    vlm_batch: int = field(default=8, metadata={"help": "VLM batch size"})
    vlm_extra: dict = field(default_factory=dict, metadata={"help": "VlmTrainConfig overrides (mapping)"})
    # frozen judges of the generator table (negdpo.generator.frozen_judges), fitted on the pool only
    judges: bool = field(
        default=True, metadata={"help": "fit the frozen judges of the generator table on the pool (needs phantoms_pretrain_n > 0)"})
    judge_pool_max: int = field(
        default=48, metadata={"help": "pool positives each generator repairs to fit the realism judge (0 = no realism AUC)"})
    # the tiny SAM pre-trained on the pool (negdpo.segmentation.sam_pretrain); 0 = off (random tiny SAM)
    sam_pretrain_steps: int = field(
        default=0, metadata={"help": "steps of the tiny SAM's pre-training on the pool (0 = off: random tiny SAM)"})
    sam_pretrain_extra: dict = field(
        default_factory=dict, metadata={"help": "SamPretrainConfig overrides (architecture, prompts, lr; mapping)"})

    # the split (or pool) each choice was made on, by choice (negdpo.study.protocol.CHOICES); results.json repeats it
    protocol: dict = field(
        default_factory=dict, metadata={"help": "the split (or pool) each choice was made on, by choice (negdpo.study.protocol.CHOICES); results.json repeats it"})

    # the twin-free rows (issue 23, negdpo.study.twinfree): generator rows sft_healthy, dpo_onpolicy[_mi]_r1..rR and
    # the CLIP rows dpo_twinfree / dhn_nce_twinfree on their pairs; off by default, sized for the quick preset
    twinfree_rows: bool = field(
        default=False, metadata={"help": "also run the twin-free rows (sft_healthy, dpo_onpolicy[_mi]_r1..rR, "
                                         "dpo_twinfree, dhn_nce_twinfree)"})
    twinfree_rounds: int = field(default=1, metadata={"help": "twin-free rows: on-policy rounds R per chain"})
    twinfree_candidates: int = field(
        default=2, metadata={"help": "twin-free rows: candidates K per training positive and round (best vs worst: >= 2)"})
    twinfree_sft_steps: int = field(
        default=300, metadata={"help": "twin-free rows: self-supervised SFT steps per generator seed"})
    twinfree_dpo_steps: int = field(default=40, metadata={"help": "twin-free rows: Diffusion-DPO steps per round"})

    def __post_init__(self) -> None:
        """Types, ranges, variant names and every ``*_extra`` key are checked before any stage runs."""
        check_positive(self, "workers", "phantoms_n", "phantoms_size", "phantoms_slices", "gen_sft_steps", "gen_dpo_steps",
                       "gen_batch", "gen_sample_steps", "pairs_k", "pairs_steps", "clip_pretrain_steps",
                       "clip_finetune_steps", "clip_batch", "bootstrap", "clip_seeds", "clip_finetune_seeds", "gen_seeds", "pg_batch", "vlm_batch")
        check_finite_positive(self, "gen_lr", "gen_beta", "gen_autoencoder_lr", "clip_pretrain_lr", "clip_finetune_lr",
                              "pg_lr", "vlm_lr")
        for key in ("pg_steps", "vlm_steps", "judge_pool_max", "sam_pretrain_steps"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0 (0 = off)")
        bad = sorted(set(self.pg_rows) - set(PG_ROWS))
        check(not bad, "pg_rows", self.pg_rows, f"unknown {bad}; choose from {list(PG_ROWS)}")
        check(self.pg_best_variant in CLIP_VARIANTS[1:], "pg_best_variant", self.pg_best_variant,
              f"one of the fine-tuned variants {list(CLIP_VARIANTS[1:])}")
        check(self.gen_init in INITS, "gen_init", self.gen_init, f"one of {list(INITS)}")
        check(0 < self.gen_strength <= 1, "gen_strength", self.gen_strength, "must be in (0, 1]")
        for key in ("gen_sample_steps", "pairs_steps"):  # diffusers runs int(steps x strength) denoising steps
            steps = getattr(self, key)
            check(int(steps * self.gen_strength) >= 1, key, steps,
                  f"x gen_strength {self.gen_strength} leaves no denoising step; needs >= "
                  f"{math.ceil(1 / self.gen_strength)}")
        check(self.gen_autoencoder_steps >= 0, "gen_autoencoder_steps", self.gen_autoencoder_steps, "must be >= 0")
        check(self.phantoms_pretrain_n >= 0, "phantoms_pretrain_n", self.phantoms_pretrain_n, "must be >= 0")
        area = self.phantoms_lesion_area
        check(area is None or (len(area) == 2 and 0 < area[0] <= area[1] < 0.5), "phantoms_lesion_area", area,
              "[lo, hi] with 0 < lo <= hi < 0.5, or null")
        bad = sorted(set(self.gen_variants) - set(GEN_VARIANTS))
        check(not bad, "gen_variants", self.gen_variants, f"unknown {bad}; choose from {list(GEN_VARIANTS)}")
        bad = sorted(set(self.clip_variants) - set(CLIP_VARIANTS))
        check(not bad, "clip_variants", self.clip_variants, f"unknown {bad}; choose from {list(CLIP_VARIANTS)}")
        check(self.pairs_adapter in GEN_VARIANTS[1:], "pairs_adapter", self.pairs_adapter,
              f"one of {list(GEN_VARIANTS[1:])}")
        bad = sorted(set(self.protocol) - set(CHOICES))
        check(not bad, "protocol", self.protocol, f"unknown choices {bad}; choose from {list(CHOICES)}")
        for key, cls in _extra_targets().items():
            setattr(self, key, check_mapping(cls, getattr(self, key), key))
        for key in ("twinfree_rounds", "twinfree_sft_steps", "twinfree_dpo_steps"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.twinfree_candidates >= 2, "twinfree_candidates", self.twinfree_candidates,
              "must be >= 2 (the best and the worst candidate make a pair)")
        owned = sorted(set(self.eval_extra) & {"control_prompt", "prompt_template", "prompts", "split", "clips"})
        check(not owned, "eval_extra", self.eval_extra, f"{owned} are set by the study (prompts: prompt_word, "
              "prompt_irrelevant; the scans' reports are the report prompt)")


def _extra_targets() -> dict[str, type]:
    """The config class each ``*_extra`` section overrides."""
    from negdpo.generator.config import GenTrainConfig
    from negdpo.preference.clip.config import ClipTrainConfig
    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.segmentation.evaluate import EvalConfig
    from negdpo.segmentation.prompt_free.train import SegTrainConfig
    from negdpo.segmentation.sam_pretrain import SamPretrainConfig
    from negdpo.segmentation.vlm_train import VlmTrainConfig

    return {"gen_extra": GenTrainConfig, "pairs_extra": BuildConfig, "clip_extra": ClipTrainConfig,
            "eval_extra": EvalConfig, "eval_reference_extra": EvalConfig, "pg_extra": SegTrainConfig, "vlm_extra": VlmTrainConfig,
            "sam_pretrain_extra": SamPretrainConfig}


def load_study_config(path: str | None, preset: str | None, overrides: list[str]) -> StudyConfig:
    """The bundled or given YAML (shared keys + ``presets:``), the preset, then ``--key value`` overrides."""
    argv = ["--config", path or str(bundled_config("phantom_study.yaml"))]
    argv += ["--preset", preset] if preset else []
    return parse_config(StudyConfig, argv + list(overrides))
