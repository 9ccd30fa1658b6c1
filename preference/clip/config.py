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
    phantoms_n: int = 24
    phantoms_size: int = 64
    phantoms_seed: int = 0
    negative_text: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    run_name: str = "clip_demo"
    loss: str = field(default="dpo", metadata={"help": "'+'-joined: dpo, dhn_nce, entropy, stages, clip"})
    # CLIP-DPO (TRL names)
    beta: float = field(default=1.0, metadata={"help": "CLIP-DPO beta", "aliases": ["--dpo_beta"]})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid | hinge | ipo"})
    label_smoothing: float = 0.0
    dpo_directions: str = "t2i,i2t"
    ref_mode: str = field(default="auto", metadata={"help": "auto | on_the_fly | cached"})
    freeze_logit_scale: bool = True
    disable_dropout: bool = True
    retention_weight: float = 0.1
    dedup_captions: bool = field(default=True, metadata={"aliases": ["--retention_dedup"], "help": "identical captions in a batch are one "
                                                                 "caption in the contrastive terms, not negatives"})
    gather_with_grad: bool = field(default=False, metadata={
        "help": "contrastive terms (dhn_nce, clip) see the negatives of every process (open_clip's flag)"})
    # DHN-NCE
    dhn_temperature: float = 0.6
    dhn_alpha: float = 0.0
    dhn_beta1: float = 0.15
    dhn_beta2: float = 0.15
    dhn_mode: str = "paper"
    # attention entropy
    entropy_weight: float = 0.05
    entropy_blocks: str = "-1"
    entropy_mask_weight: float = 0.0
    # two-stage OT
    stages_weight: float = 1.0
    ot_reg: float = 0.05
    ot_weight: float = 1.0
    stage_temperature: float = 0.1
    curriculum_start: float = 0.3
    curriculum_end: float = 0.7
    # what trains
    finetune: str = field(default="full", metadata={"help": "full | lock_image | lock_text | lora"})
    lora_towers: str = "both"
    rank: int = field(default=8, metadata={"help": "LoRA rank", "aliases": ["--lora_rank"]})
    lora_alpha: int = 16
    # optimisation defaults of open_clip
    adam_weight_decay: float = field(default=0.1, metadata={"aliases": ["--weight_decay"]})
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    lr_scheduler: str = "cosine"
    train_batch_size: int = 8
    eval_batch_size: int = 32
    max_train_steps: int = 60
    logging_steps: int = 5
    dataloader_num_workers: int = 0
    # bookkeeping
    tsne: bool = True
    tsne_max_points: int = 600
    save_final: bool = True
    progress_bar: bool = True

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
