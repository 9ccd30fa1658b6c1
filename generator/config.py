"""The generator trainer's run config (no torch import: ``gen_train.py --help`` and config errors are fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from negdpo.core.config import (
    check,
    check_choice,
    check_finite_positive,
    check_positive,
    check_probability,
    parse_weights,
)
from negdpo.core.training import TrainConfig
from negdpo.core.window import ScanReading

TRAINING_JUDGES = ("lesion", "realism", "mi_out", "fidelity_out")  # the on-policy rounds' judges


def parse_judge_weights(spec: str) -> dict[str, float]:
    """``"lesion=1,realism=0.5"`` -> {lesion: 1.0, realism: 0.5}; names from ``TRAINING_JUDGES``, weights >= 0."""
    return parse_weights(spec, TRAINING_JUDGES, "training judge")


@dataclass
class GenTrainConfig(TrainConfig, ScanReading):
    """Run config (YAML via --config, flags override). ``beta`` uses the convention WITH the 1/2."""

    # data and model
    pretrained_model_name_or_path: str = field(
        default="tiny", metadata={"help": "tiny | tiny-txt2img | hub id | diffusers folder",
                                  "aliases": ["--pretrained_model"]})
    dataset_name: str = field(default="data/phantoms", metadata={
        "help": "scan folder or pair dataset from build-pairs (save_to_disk/parquet)", "aliases": ["--data"]})
    make_phantoms: bool = field(default=False, metadata={"help": "generate phantoms into dataset_name if absent"})
    phantoms_n: int = field(default=24, metadata={"help": "with make_phantoms: phantom subjects to generate"})
    phantoms_size: int = field(default=64, metadata={"help": "with make_phantoms: phantom image side in px"})
    train_split: str = field(
        default="train", metadata={"help": "split (or dataset split) the pairs are trained on"})
    val_split: str = field(default="val", metadata={"help": "held-out split(s), comma-separated (e.g. val,test)"})
    chosen_source: str = field(default="auto", metadata={"help": "scan folders: auto | twin | classical"})
    max_train_pairs: int | None = field(
        default=None, metadata={"help": "at most this many training pairs (default: all)"})
    resolution: int = field(default=0, metadata={"help": "training resolution in px (0 = the UNet's native size)"})
    run_name: str = field(
        default="demo", metadata={"help": "run name: names the default output folder and the tracker run"})
    # method
    train_method: str = field(default="dpo", metadata={
        "help": "dpo | sft | onpolicy (R rounds: sample K candidates, judge, DPO on the best vs worst; no twins)"})
    sft_source: str = field(default="twin", metadata={
        "help": "sft target: twin (the pair's chosen image: the healthy twin on phantoms, see chosen_source) | "
                "healthy (self-supervised: repaint lesion-shaped masks on healthy tissue; never reads twins)"})
    selfsup_masks_per_image: int = field(default=4, metadata={"help": "sft_source=healthy: repaint masks per scan"})
    selfsup_margin: int = field(default=4, metadata={
        "help": "sft_source=healthy: px a repaint mask keeps from a positive's lesion"})
    beta: float = field(default=5000.0, metadata={"help": "DPO beta, convention WITH the 1/2 (= 2 x diffusers' beta_dpo)"})
    beta_dpo: float | None = field(default=None, metadata={"help": "diffusers' scale (no 1/2); sets beta = 2 x beta_dpo"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid | hinge | ipo"})
    mask_weighted_error: bool = field(
        default=True, metadata={"help": "per-sample error averaged over the (dilated) lesion mask, not the whole latent (docs/method.md#diffusion-dpo)"})
    mask_dilate_latent: int = field(
        default=1, metadata={"help": "latent px the mask of the mask-weighted error is dilated by"})
    outside_gamma: float = field(
        default=0.0, metadata={"help": "weight of the outside-mask error added to the mask-weighted error (0 = inside only)"})
    sdpo: bool = field(
        default=True, metadata={"help": "Diffusion-SDPO: scale the loser's gradient so the winner's error does not grow (docs/method.md#sdpo)"})
    sdpo_mu: float = field(
        default=0.9, metadata={"help": "SDPO safeguard mu in (0, 1): larger keeps the winner's error down more"})
    mi_weight: float = field(
        default=0.0, metadata={"help": "weight of the masked-MI hinge keeping the anatomy outside the lesion (0 = off; docs/method.md#masked-mi)"})
    mi_bins: int = field(default=23, metadata={"help": "Parzen bins of the MI estimator"})
    mi_t_max: int = field(
        default=500, metadata={"help": "MI and fidelity terms only at timesteps below this"})
    mi_dilate_latent: int = field(
        default=1, metadata={"help": "latent px the lesion is dilated by before its outside is weighted in MI and fidelity"})
    fidelity_weight: float = field(
        default=0.0, metadata={"help": "weight of the reference-relative outside-mask L1 term (0 = off; docs/method.md#fidelity)"})
    proportion_empty_prompts: float = field(
        default=0.0, metadata={"help": "share of prompts replaced by the empty text (classifier-free guidance training)"})
    hflip_prob: float = field(default=0.5, metadata={"help": "probability of a horizontal flip of a pair"})
    curriculum_stages: int = field(
        default=1, metadata={"help": "curriculum groups, easy to hard by judge margin (1 = off; docs/method.md#curriculum)"})
    curriculum_every: int = field(
        default=0, metadata={"help": "optimizer steps per curriculum stage (0 = off)"})
    sft_include_healthy: bool = field(
        default=True, metadata={"help": "sft: also train on the split's healthy scans, repainting a random blob with the scan itself"})
    # on-policy rounds (train_method=onpolicy; docs/method.md#on-policy-rounds)
    rounds: int = field(default=2, metadata={"help": "onpolicy: number of rounds R"})
    candidates: int = field(default=4, metadata={"help": "onpolicy: candidates K per training positive and round"})
    onpolicy_rejected: str = field(default="worst", metadata={
        "help": "onpolicy: rejected = worst candidate | source (the positive itself)"})
    judge_weights: str = field(default="lesion=1,realism=0.5,mi_out=0.25,fidelity_out=0.25", metadata={
        "help": "onpolicy: training judges and weights (lesion, realism, mi_out, fidelity_out)"})
    sample_steps: int = field(default=10, metadata={"help": "onpolicy: sampler steps per candidate"})
    sample_strength: float = field(default=0.5, metadata={"help": "onpolicy: SDEdit strength (1 = pure noise)"})
    sample_init: str = field(default="harmonic", metadata={"help": "onpolicy: sampler start, source | harmonic"})
    repaint_dilate: int = field(default=2, metadata={"help": "onpolicy: px the lesion mask is dilated to repaint"})
    sample_batch: int = field(default=8, metadata={"help": "onpolicy: positives per sampling chunk (resume unit)"})
    # reference
    reference: str = field(default="disable_adapters", metadata={"help": "disable_adapters | adapter | model"})
    reference_adapter: str | None = field(default=None, metadata={"help": "SFT adapter folder used as reference"})
    reference_mode: str = field(default="fuse", metadata={"help": "fuse (into base) | adapter (named)"})
    reference_model: str | None = field(default=None, metadata={"help": "explicit frozen reference (reference=model)"})
    # LoRA
    rank: int = field(default=8, metadata={"help": "LoRA rank", "aliases": ["--lora_rank"]})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default: the rank, i.e. scale 1)"})
    lora_targets: str = field(
        default="to_q,to_k,to_v,to_out.0", metadata={"help": "comma list of UNet module names that get LoRA"})
    lora_init: str = field(
        default="gaussian", metadata={"help": "LoRA init that leaves the base weights untouched: gaussian | true (PEFT's default)"})
    # memory / speed
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in the backward pass (less memory, slower)"})
    cache_latents: bool = field(
        default=False, metadata={"help": "encode every image once with the VAE before training (faster, more memory)"})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "xformers attention (needs a GPU and the gpu extra)"})
    # validation
    num_validation_images: int = field(
        default=4, metadata={"help": "held-out pairs sampled into the validation grid"})
    validation_inference_steps: int = field(
        default=10, metadata={"help": "sampling steps of the validation images"})
    eval_pairs: int = field(
        default=16, metadata={"help": "held-out pairs of the implicit-accuracy evaluation before/after training (0 = off)"})
    eval_draws: int = field(
        default=4, metadata={"help": "noise/timestep draws per held-out pair of that evaluation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ScanReading.__post_init__(self)
        if self.beta_dpo is not None:
            check_finite_positive(self, "beta_dpo")
            self.beta = 2.0 * self.beta_dpo
        check_finite_positive(self, "beta", "sdpo_mu")
        check_choice(self, "train_method", ("dpo", "sft", "onpolicy"))
        check_choice(self, "sft_source", ("twin", "healthy"))
        check_choice(self, "onpolicy_rejected", ("worst", "source"))
        check_choice(self, "sample_init", ("source", "harmonic"))
        check(0.0 < self.sample_strength <= 1.0, "sample_strength", self.sample_strength, "must be in (0, 1]")
        check(self.candidates >= 2 or self.onpolicy_rejected == "source", "candidates", self.candidates,
              "onpolicy_rejected=worst needs at least 2 candidates")
        check_choice(self, "loss_type", ("sigmoid", "hinge", "ipo"))
        check_choice(self, "chosen_source", ("auto", "twin", "classical"))
        check_choice(self, "reference", ("disable_adapters", "adapter", "model"))
        check_choice(self, "reference_mode", ("fuse", "adapter"))
        check_positive(self, "rank", "mi_bins", "curriculum_stages", "validation_inference_steps", "eval_draws",
                       "phantoms_n", "selfsup_masks_per_image", "rounds", "candidates", "sample_steps",
                       "sample_batch")
        check_probability(self, "proportion_empty_prompts", "hflip_prob")
        for key in ("mi_weight", "fidelity_weight", "outside_gamma", "eval_pairs", "num_validation_images",
                    "resolution", "mask_dilate_latent", "mi_dilate_latent", "curriculum_every",
                    "selfsup_margin", "repaint_dilate"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        check(self.sdpo_mu < 1.0 or not self.sdpo, "sdpo_mu", self.sdpo_mu, "must be in (0, 1)")
        check(self.reference != "model" or bool(self.reference_model), "reference_model", self.reference_model,
              "reference=model needs --reference_model")
        try:
            parse_judge_weights(self.judge_weights)
        except ValueError as err:
            check(False, "judge_weights", self.judge_weights, str(err))
        check(bool(self.lora_targets.strip()), "lora_targets", self.lora_targets, "must name at least one module")
