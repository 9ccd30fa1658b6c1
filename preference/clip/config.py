"""The CLIP trainer's run config (no torch import: ``clip_train.py --help`` and config errors are fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from negdpo.core.config import check, check_choice, check_finite_positive, check_positive, check_probability
from negdpo.core.training import TrainConfig
from negdpo.core.window import ScanReading

LOSS_PARTS = ("dpo", "dhn_nce", "entropy", "stages", "clip")


@dataclass
class ClipTrainConfig(TrainConfig, ScanReading):
    """Run config (YAML via --config, flags override); shared fields in :class:`negdpo.core.training.TrainConfig`."""

    pretrained_model_name_or_path: str = field(default="tiny", metadata={
        "help": "tiny | hf-hub:<id> | local-dir:<folder>", "aliases": ["--model"]})
    dataset_name: str = field(default="", metadata={
        "help": "scan folder with *_twins, or pair-dataset folder; empty = phantoms next to output_dir",
        "aliases": ["--data"]})
    phantoms_n: int = field(
        default=24, metadata={"help": "without dataset_name: phantom subjects to generate"})
    phantoms_size: int = field(
        default=64, metadata={"help": "without dataset_name: phantom image side in px"})
    phantoms_seed: int = field(default=0, metadata={"help": "without dataset_name: seed of the phantoms"})
    negative_text: str | None = field(
        default=None, metadata={"help": "healthy text of every pair (default: per modality, from the folder's healthy scans)"})
    train_split: str = field(default="train", metadata={"help": "split the pairs are trained on"})
    val_split: str = field(default="val", metadata={"help": "held-out split of the before/after evaluation"})
    run_name: str = field(
        default="clip_demo", metadata={"help": "run name: names the default output folder and the tracker run"})
    loss: str = field(default="dpo", metadata={"help": "'+'-joined: dpo, dhn_nce, entropy, stages, clip"})
    # CLIP-DPO (TRL names)
    beta: float = field(default=1.0, metadata={"help": "CLIP-DPO beta", "aliases": ["--dpo_beta"]})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid | hinge | ipo"})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing epsilon of the sigmoid loss, in [0, 1]"})
    dpo_directions: str = field(
        default="t2i,i2t", metadata={"help": "DPO terms: t2i, i2t or t2i,i2t (docs/method.md#clip-dpo)"})
    ref_mode: str = field(default="auto", metadata={"help": "auto | on_the_fly | cached"})
    freeze_logit_scale: bool = field(
        default=True, metadata={"help": "keep the logit scale fixed (a trainable one lets DPO inflate every margin)"})
    disable_dropout: bool = field(
        default=True, metadata={"help": "switch dropout off in both towers, for the policy and the reference"})
    retention_weight: float = field(
        default=0.1, metadata={"help": "weight of the contrastive retention term (loss part clip; docs/method.md#contrastive-retention)"})
    dedup_captions: bool = field(default=True, metadata={"aliases": ["--retention_dedup"], "help": "identical captions in a batch are one "
                                                                 "caption in the contrastive terms, not negatives"})
    gather_with_grad: bool = field(default=False, metadata={
        "help": "contrastive terms (dhn_nce, clip) see the negatives of every process (open_clip's flag)"})
    # DHN-NCE
    dhn_temperature: float = field(
        default=0.6, metadata={"help": "DHN-NCE temperature tau (docs/method.md#dhn-nce)"})
    dhn_alpha: float = field(
        default=0.0, metadata={"help": "DHN-NCE weight of the positive in the denominator (0 = decoupled)"})
    dhn_beta1: float = field(default=0.15, metadata={"help": "DHN-NCE hardness beta1 (image -> text)"})
    dhn_beta2: float = field(default=0.15, metadata={"help": "DHN-NCE hardness beta2 (text -> image)"})
    dhn_mode: str = field(
        default="paper", metadata={"help": "DHN-NCE formula: paper | parity (the public hnl.py; for comparison only)"})
    # attention entropy
    entropy_weight: float = field(
        default=0.05, metadata={"help": "weight of the attention-entropy term (loss part entropy; docs/method.md#attention-entropy)"})
    entropy_blocks: str = field(
        default="-1", metadata={"help": "comma list of vision blocks whose attention is regularised (-1 = last)"})
    entropy_mask_weight: float = field(
        default=0.0, metadata={"help": "weight of the attention-to-lesion cross-entropy added to the entropy term (0 = off)"})
    # two-stage OT
    stages_weight: float = field(
        default=1.0, metadata={"help": "weight of the two-stage OT objective (loss part stages; docs/method.md#two-stage-ot)"})
    ot_reg: float = field(default=0.05, metadata={"help": "Sinkhorn entropic regularisation epsilon"})
    ot_weight: float = field(default=1.0, metadata={"help": "weight of the OT cost inside stage 1"})
    stage_temperature: float = field(
        default=0.1, metadata={"help": "temperature T of the lesion InfoNCE terms"})
    curriculum_start: float = field(
        default=0.3, metadata={"help": "training progress where stage 2 starts to take over, in [0, 1]"})
    curriculum_end: float = field(
        default=0.7, metadata={"help": "training progress where stage 2 has fully taken over, in [0, 1]"})
    # what trains
    finetune: str = field(default="full", metadata={"help": "full | lock_image | lock_text | lora"})
    lora_towers: str = field(
        default="both", metadata={"help": "finetune=lora: towers that get LoRA: both | image | text"})
    rank: int = field(default=8, metadata={"help": "LoRA rank", "aliases": ["--lora_rank"]})
    lora_alpha: int = field(default=16, metadata={"help": "finetune=lora: LoRA alpha"})
    # optimisation defaults of open_clip
    adam_weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW decoupled weight decay", "aliases": ["--weight_decay"]})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "learning-rate schedule: cosine | constant | linear | ..."})
    train_batch_size: int = field(default=8, metadata={"help": "pairs per device and micro-batch"})
    eval_batch_size: int = field(default=32, metadata={"help": "pairs per batch of the held-out evaluation"})
    max_train_steps: int = field(default=60, metadata={"help": "optimizer steps of the run"})
    logging_steps: int = field(default=5, metadata={"help": "log metrics every N optimizer steps"})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes (0 = in the main process)"})
    # bookkeeping
    tsne: bool = field(
        default=True, metadata={"help": "write tsne.png and the lesion/background silhouette of patch features before and after"})
    tsne_max_points: int = field(
        default=600, metadata={"help": "at most this many patch features in the t-SNE"})
    save_final: bool = field(
        default=True, metadata={"help": "save the trained model as an open_clip folder (final/)"})
    progress_bar: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ScanReading.__post_init__(self)
        self.parts()
        check_finite_positive(self, "beta", "dhn_temperature", "stage_temperature", "ot_reg")
        check_choice(self, "loss_type", ("sigmoid", "hinge", "ipo"))
        check_choice(self, "ref_mode", ("auto", "on_the_fly", "cached"))
        check_choice(self, "finetune", ("full", "lock_image", "lock_text", "lora"))
        check_choice(self, "dhn_mode", ("paper", "parity"))
        check_positive(self, "eval_batch_size", "rank", "phantoms_n", "tsne_max_points")
        check_probability(self, "label_smoothing", "curriculum_start", "curriculum_end")
        for key in ("retention_weight", "entropy_weight", "entropy_mask_weight", "stages_weight", "ot_weight",
                    "dataloader_num_workers"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        dirs = {d.strip() for d in self.dpo_directions.split(",") if d.strip()}
        check(bool(dirs) and dirs <= {"t2i", "i2t"}, "dpo_directions", self.dpo_directions, "t2i, i2t or t2i,i2t")

    def parts(self) -> set[str]:
        parts = {p.strip() for p in self.loss.split("+") if p.strip()}
        bad = parts - set(LOSS_PARTS)
        if bad or not parts:
            raise ValueError(f"loss '{self.loss}': unknown part(s) {sorted(bad)}; use '+'-joined {LOSS_PARTS}")
        return parts
