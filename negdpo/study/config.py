"""The study's settings (:class:`StudyConfig`, filled by the presets of configs/phantom_study.yaml) and their loader."""

from __future__ import annotations

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

    preset: str = "quick"
    out: str = "results/phantom_study"
    work_dir: str = "outputs/phantom_study"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0 = torch default; 1 is much faster on a shared 2-core CPU)
    workers: int = 1  # processes for independent CLIP stages (base per seed, fine-tunes); same numbers, less wall time
    # phantoms
    phantoms_n: int = 40
    phantoms_size: int = 64
    phantoms_slices: int = 2
    phantoms_pretrain_n: int = 0  # subjects of the disjoint pre-training pool (0: the base CLIP pre-trains on train)
    phantoms_lesion_area: list[float] | None = None  # [lo, hi] share of the image; None = the original radius law
    # which variants to run (a reduced study runs a subset; the tables show what ran)
    gen_variants: list[str] = field(default_factory=lambda: list(GEN_VARIANTS))
    clip_variants: list[str] = field(default_factory=lambda: list(CLIP_VARIANTS))
    # generator (tiny or a real SD-inpainting id/folder)
    gen_model: str = "tiny"
    gen_autoencoder_steps: int = 0  # > 0: adapt the VAE to the phantoms first (negdpo.generator.autoencoder)
    gen_autoencoder_lr: float = 1e-3
    gen_sft_steps: int = 60
    gen_dpo_steps: int = 60
    gen_batch: int = 4
    gen_lr: float = 1e-3
    gen_beta: float = 5000.0
    gen_mi_weight: float = 0.1
    gen_fidelity_weight: float = 0.01
    gen_sdpo_mu: float = 0.9
    gen_sample_steps: int = 20
    gen_seam_px: float = 2.0  # soft seam of the paste-back rows (generator.sample.paste_back_blend)
    gen_init: str = "source"  # what the learned generators' sampling (table rows and pairs) starts from: source |
    gen_strength: float = 1.0  # harmonic (generator.sample.inpaint's init), noised to this strength (1 = pure noise)
    gen_extra: dict = field(default_factory=dict)
    gen_seeds: int = 1  # generator training seeds seed, seed + 1, ...: the generator comparisons resample them
    gen_isolation_rows: bool = True  # rows harmonic_vae (fill through the autoencoder) and harmonic_untrained
    # pairs
    pairs_k: int = 2
    pairs_steps: int = 10
    pairs_adapter: str = "dpo_mi_sdpo"
    pairs_extra: dict = field(default_factory=dict)  # BuildConfig overrides
    # CLIP
    clip_model: str = "tiny"
    clip_pretrain_steps: int = 150
    clip_finetune_steps: int = 60
    clip_batch: int = 8
    clip_pretrain_lr: float = 5e-4
    clip_finetune_lr: float = 5e-5
    clip_seeds: int = 1  # every CLIP variant (base included) is trained with seeds seed, seed+1, ...
    clip_finetune_seeds: int = 1  # fine-tunes per base seed s: seeds s, s + 1000, s + 2000, ... (run "s/<ft seed>")
    clip_extra: dict = field(default_factory=dict)
    # segmentation
    eval_saliency: str = "m2ib"
    eval_sam: str = "none"
    eval_extra: dict = field(default_factory=dict)
    eval_reference_saliency: str = ""  # e.g. m2ib: the base CLIPs also through this saliency (row base_reference)
    eval_reference_extra: dict = field(default_factory=dict)  # EvalConfig overrides of that reference evaluation
    prompt_word: str = "tumor"  # the one-word prompt of the prompt-sensitivity rows
    prompt_irrelevant: str = "a photo of a cat sitting on a chair"
    bootstrap: int = 2000
    # stage 2 (negdpo.segmentation.prompt_generator, prompt-free, on the first seed's chains) and VL-SAM rows
    pg_steps: int = 0  # prompt-generator training steps per row (0 = no pg_* rows)
    pg_lr: float = 1e-2
    pg_batch: int = 2
    pg_rows: list[str] = field(default_factory=lambda: list(PG_ROWS))
    pg_best_variant: str = "dpo_gen"  # the fine-tuned chain of pg_pseudo_best, fixed in advance (no peek at test)
    pg_extra: dict = field(default_factory=dict)  # SegTrainConfig overrides
    vlm_steps: int = 0  # report-generation steps of the tiny VLM on the pre-training pool (0 = no vlsam row)
    vlm_lr: float = 2e-3
    vlm_batch: int = 8
    vlm_extra: dict = field(default_factory=dict)  # VlmTrainConfig overrides
    # frozen judges of the generator table (negdpo.generator.frozen_judges), fitted on the pool only
    judges: bool = True  # needs phantoms_pretrain_n > 0
    judge_pool_max: int = 48  # pool positives each generator repairs to fit the realism judge (0 = no realism AUC)
    # the tiny SAM pre-trained on the pool (negdpo.segmentation.sam_pretrain); 0 = off (random tiny SAM)
    sam_pretrain_steps: int = 0
    sam_pretrain_extra: dict = field(default_factory=dict)  # SamPretrainConfig overrides (architecture, prompts, lr)

    # the split (or pool) each choice was made on, by choice (negdpo.study.protocol.CHOICES); results.json repeats it
    protocol: dict = field(default_factory=dict)

    # the twin-free rows (issue 23, negdpo.study.twinfree): generator rows sft_healthy, dpo_onpolicy[_mi]_r1..rR and
    # the CLIP rows dpo_twinfree / dhn_nce_twinfree on their pairs; off by default, sized for the quick preset
    twinfree_rows: bool = False
    twinfree_rounds: int = 1  # on-policy rounds R per chain
    twinfree_candidates: int = 2  # candidates K per training positive and round (best vs worst: >= 2)
    twinfree_sft_steps: int = 300  # self-supervised SFT steps per generator seed
    twinfree_dpo_steps: int = 40  # Diffusion-DPO steps per round

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
    from negdpo.segmentation.prompt_generator.train import SegTrainConfig
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
