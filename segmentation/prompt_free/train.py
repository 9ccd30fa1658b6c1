"""Train the prompt generator (stage 2: pseudo-labels; or ground truth: the supervised ceiling).

    accelerate launch seg_train.py                                  # configs/seg_demo.yaml: phantoms, tiny SAM
    accelerate launch seg_train.py --data DIR --targets EVAL_OUT --sam vit_b --sam_checkpoint sam_vit_b.pth

``targets``: empty = the scan folder's ground-truth masks; a ``negdpo evaluate`` output folder = its
pseudo-labels (``masks/``; ``targets_checkpoint`` picks one when it holds several); any other folder =
one mask per image. SAM stays frozen; the generator (and optional adapters) train with the Hungarian-
matched set loss. Outputs: ``final/`` (load with ``prompt-free:DIR``), ``checkpoint-*/``,
``metrics.jsonl``, ``summary.json`` (loss and Dice on the training images before / after), ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from negdpo.core.config import check, check_choice, check_positive
from negdpo.core.training import TrainConfig
from negdpo.core.window import ScanReading

from .data import Sample, collate, load_samples, resolve_target_dir
from .inference import load_trainable, save_prompt_free
from .matching import LossWeights, set_loss
from .model import PromptFreeConfig, PromptSAM

logger = logging.getLogger(__name__)


@dataclass
class SegTrainConfig(TrainConfig, ScanReading):
    run_name: str = "seg_demo"
    learning_rate: float = 1e-3
    train_batch_size: int = 2
    max_train_steps: int = 100
    # data
    data: str = field(default="", metadata={"help": "scan folder; empty = phantoms next to the output folder"})
    phantoms_n: int = field(default=12, metadata={"help": "without data: phantom subjects to generate"})
    phantoms_size: int = field(default=64, metadata={"help": "without data: phantom image side in px"})
    phantoms_seed: int = field(default=0, metadata={"help": "without data: seed of the phantoms"})
    train_split: str = field(default="train", metadata={"help": "split the generator is trained on"})
    targets: str = field(default="", metadata={"help": "'' = ground truth | a negdpo evaluate output | a mask folder"})
    targets_checkpoint: str = field(default="", metadata={"help": "checkpoint subfolder of an evaluate output"})
    class_values: list[int] = field(default_factory=list, metadata={
        "help": "mask pixel value of each class (empty: any non-zero pixel is the one class)"})
    target_mode: str = field(default="components", metadata={"help": "components | classes: what one target is"})
    min_target_area: int = field(
        default=1, metadata={"help": "smallest target component in px (smaller ones are dropped)"})
    max_train_images: int | None = field(
        default=None, metadata={"help": "at most this many training images (default: all)"})
    eval_images: int = field(default=16, metadata={"help": "training images scored before / after (0 = none)"})
    cache_features: bool = field(default=True, metadata={
        "help": "encode each image once (frozen encoder, no encoder adapters) if it fits cache_max_gb"})
    cache_max_gb: float = field(
        default=4.0, metadata={"help": "largest feature cache in GB (larger: no cache)"})
    # model
    sam: str = field(default="tiny", metadata={"help": "tiny | vit_b | vit_l | vit_h"})
    sam_checkpoint: str | None = field(
        default=None, metadata={"help": "SAM weights file (.pth) (default: the preset's, or found in ./checkpoints or $SAM_CHECKPOINT_DIR)"})
    num_queries: int = field(default=4, metadata={"help": "queries N: the most targets per image"})
    hidden_dim: int = field(default=64, metadata={"help": "width of the fused features and the query head"})
    prompts: str = field(default="box+mask", metadata={"help": "box+mask | box | mask: prompts given to SAM"})
    encoder_adapters: bool = field(
        default=False, metadata={"help": "train adapters after SAM's encoder blocks (turns the feature cache off)"})
    decoder_adapters: bool = field(
        default=True, metadata={"help": "train adapters after the mask decoder's transformer layers"})
    adapter_dim: int = field(default=16, metadata={"help": "bottleneck width of the adapters"})
    score_threshold: float = field(
        default=0.5, metadata={"help": "inference: queries scoring at least this give the prediction"})
    # loss (cost and loss weights, DETR / MaskSAM)
    weight_class: float = field(
        default=2.0, metadata={"help": "matching cost and loss weight of the class term"})
    weight_l1: float = field(
        default=5.0, metadata={"help": "matching cost and loss weight of the box L1 term"})
    weight_giou: float = field(
        default=2.0, metadata={"help": "matching cost and loss weight of the box GIoU term"})
    weight_bce: float = field(
        default=5.0, metadata={"help": "matching cost and loss weight of the mask BCE term"})
    weight_dice: float = field(
        default=5.0, metadata={"help": "matching cost and loss weight of the mask Dice term"})
    no_object_weight: float = field(
        default=0.1, metadata={"help": "class weight of \"no object\" in the cross-entropy, in [0, 1]"})
    aux_weight: float = field(default=1.0, metadata={"help": "weight of the auxiliary-mask BCE + Dice terms"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ScanReading.__post_init__(self)
        check_positive(self, "num_queries", "hidden_dim", "adapter_dim", "min_target_area")
        check_choice(self, "target_mode", ("components", "classes"))
        check_choice(self, "prompts", ("box+mask", "box", "mask"))
        check(0 <= self.no_object_weight <= 1, "no_object_weight", self.no_object_weight, "must be in [0, 1]")
        check(self.eval_images >= 0, "eval_images", self.eval_images, "must be >= 0")

    def generator_config(self) -> PromptFreeConfig:
        ckpt = str(Path(self.sam_checkpoint).resolve()) if self.sam_checkpoint else None
        return PromptFreeConfig(num_queries=self.num_queries, num_classes=max(1, len(self.class_values)),
                               hidden_dim=self.hidden_dim, prompts=self.prompts, encoder_adapters=self.encoder_adapters,
                               decoder_adapters=self.decoder_adapters, adapter_dim=self.adapter_dim, sam=self.sam,
                               sam_checkpoint=ckpt)

    def loss_weights(self) -> LossWeights:
        return LossWeights(cls=self.weight_class, l1=self.weight_l1, giou=self.weight_giou, bce=self.weight_bce,
                           dice=self.weight_dice, no_object_weight=self.no_object_weight, aux_weight=self.aux_weight)


def resolve_data(cfg: SegTrainConfig, out: Path) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from negdpo.core.phantoms import ensure_phantoms

    return ensure_phantoms(out.parent / f"phantoms_n{cfg.phantoms_n}_s{cfg.phantoms_size}_seed{cfg.phantoms_seed}",
                           n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.phantoms_seed, slices=2, preview=False)


@torch.no_grad()
def cache_features(model: PromptSAM, samples: list[Sample], max_gb: float) -> bool:
    """Encode every image once (frozen encoder) and keep the hooked features on the CPU, if they fit."""
    if model.cfg.encoder_adapters or not samples:
        return False
    device = model.sam.device
    first = model.encode(samples[0].image[None].to(device))
    per_image = sum(t[0].numel() for t in [*first["blocks"], first["neck"]]) * 4
    if per_image * len(samples) > max_gb * 2**30:
        logger.info("feature cache would need %.1f GB > cache_max_gb; encoding every step",
                    per_image * len(samples) / 2**30)
        return False
    for i, s in enumerate(samples):
        f = first if i == 0 else model.encode(s.image[None].to(device))
        s.features = {"blocks": [b[0].cpu() for b in f["blocks"]], "neck": f["neck"][0].cpu()}
    return True


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch, input_hw=batch["input_hw"].to(device),
               targets=[{k: v.to(device) for k, v in t.items()} for t in batch["targets"]])
    if "features" in batch:
        out["features"] = {"blocks": [b.to(device) for b in batch["features"]["blocks"]],
                           "neck": batch["features"]["neck"].to(device)}
    else:
        out["images"] = batch["images"].to(device)
    return out


def forward(model, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return model(images=batch.get("images"), input_hw=batch["input_hw"], features=batch.get("features"))


@torch.no_grad()
def score(model: PromptSAM, samples: list[Sample], weights: LossWeights, threshold: float,
          device: torch.device) -> dict[str, float]:
    """Mean set loss, and mean Dice of the predicted union mask (final: ``dice``; auxiliary: ``aux_dice``; queries
    scoring >= threshold) vs the target union in the mask frame, over ``samples``."""
    was = model.training
    model.eval()
    rows = []
    for s in samples:
        batch = _to(collate([s]), device)
        out = forward(model, batch)
        loss, _ = set_loss(out, batch["targets"], weights, model.cfg.num_classes)
        keep = (1 - out["logits"][0].float().softmax(-1)[:, -1]) >= threshold
        t = batch["targets"][0]["masks"]
        gt = t.amax(0) if len(t) else torch.zeros(out["masks"].shape[-2:], device=device)
        row = {"loss": float(loss)}
        for key, name in (("masks", "dice"), ("aux_masks", "aux_dice")):
            pred = ((out[key][0] > 0) & keep[:, None, None]).any(0).float()
            denom = float(pred.sum() + gt.sum())
            row[name] = 1.0 if denom == 0 else float(2 * (pred * gt).sum()) / denom
        rows.append(row)
    model.train(was)
    return {k: sum(r[k] for r in rows) / max(len(rows), 1) for k in ("loss", "dice", "aux_dice")}


def train(cfg: SegTrainConfig, sam: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run one training; returns the summary (also written to ``output_dir/summary.json``).

    ``sam``: a prebuilt ``segment_anything`` ``Sam`` to use instead of loading ``cfg.sam`` (programmatic use,
    tests); the saved generator still records ``cfg.sam``, which must name that model to load it again."""
    from negdpo.core.models import load_sam
    from negdpo.core.training import (
        MetricsLog,
        NonFiniteGuard,
        epoch_batches,
        finish_run,
        make_optimizer,
        make_scheduler,
        resume_step,
        save_checkpoint,
        start_run,
        update,
    )
    from tqdm.auto import tqdm

    t_start = time.time()
    run = start_run(cfg, "segmentation", owner="seg_train")
    accelerator, out = run.accelerator, run.out
    with accelerator.main_process_first():
        data = resolve_data(cfg, out)
    resolve_target_dir(data, cfg.train_split, cfg.targets, cfg.targets_checkpoint)  # fail before SAM loads
    device = accelerator.device
    sam = load_sam(cfg.sam, cfg.sam_checkpoint, device) if sam is None else sam.to(device).eval()
    model = PromptSAM(sam, cfg.generator_config()).to(device)
    samples = load_samples(sam, data, cfg.train_split, cfg.targets, cfg.targets_checkpoint, cfg.class_values,
                           cfg.target_mode, cfg.min_target_area, cfg.max_train_images, reading=cfg.reading())
    n_targets = sum(int(s.target["labels"].numel()) for s in samples)
    logger.info("%d training images, %d targets (%s)", len(samples), n_targets, cfg.target_mode)
    cached = cfg.cache_features and cache_features(model, samples, cfg.cache_max_gb)
    weights = cfg.loss_weights()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    base = accelerator.unwrap_model(model)

    def save_hook(models, state, output_dir):  # only the generator + adapters, not SAM
        if accelerator.is_main_process:
            for m in models:
                save_prompt_free(accelerator.unwrap_model(m), output_dir)
        while state:
            state.pop()

    def load_hook(models, input_dir):
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), Path(input_dir) / "prompt_generator.safetensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    step = resume_step(run, cfg)
    metrics_log = MetricsLog(run, step)
    eval_set = samples[: cfg.eval_images]
    summary: dict[str, Any] = {"output_dir": str(out), "train_images": len(samples), "targets": n_targets,
                               "feature_cache": bool(cached)}
    if eval_set:
        summary["before"] = score(base, eval_set, weights, cfg.score_threshold, device)
        accelerator.print(f"training images before: {summary['before']}")
    guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
    progress = tqdm(range(cfg.max_train_steps), initial=step, desc="seg_train", disable=not accelerator.is_local_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    model.train()
    while step < cfg.max_train_steps:
        logs: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            flat = step * cfg.gradient_accumulation_steps + micro
            idx = epoch_batches(len(samples), cfg.train_batch_size, flat, cfg.seed, world, rank)
            batch = _to(collate([samples[i] for i in idx]), device)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = forward(model, batch)
                loss, m = set_loss(outputs, batch["targets"], weights, base.cfg.num_classes)
                grad_norm = update(run, loss, params, optimizer, scheduler, guard, cfg, step)
                if grad_norm is not None:
                    m["grad_norm"] = grad_norm
            for k, v in m.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.gradient_accumulation_steps
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}")
        logs["lr"] = scheduler.get_last_lr()[0]
        if step % cfg.logging_steps == 0 or step == cfg.max_train_steps:
            metrics_log.log(step, logs)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
            save_checkpoint(run, step, cfg.checkpoints_total_limit)
    progress.close()
    accelerator.wait_for_everyone()
    if eval_set:
        summary["after"] = score(base, eval_set, weights, cfg.score_threshold, device)
        accelerator.print(f"training images after: {summary['after']}")
    if accelerator.is_main_process:
        meta = {"score_threshold": cfg.score_threshold, "steps": step, "data": str(data), "targets": cfg.targets or "gt",
                "targets_checkpoint": cfg.targets_checkpoint, "class_values": cfg.class_values,
                "target_mode": cfg.target_mode}
        save_prompt_free(base, out / "final", meta)
        summary.update(steps=step, checkpoint=str((out / "final").resolve()), metrics=str(metrics_log.path),
                       wall_s=round(time.time() - t_start, 1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    finish_run(run)
    return summary


def _run(argv: list[str]) -> int:
    from negdpo.core.config import bundled_config, parse_config

    cfg = parse_config(SegTrainConfig, argv, default_config=str(bundled_config("seg_demo.yaml")))
    from negdpo.core.models import ModelNotAvailableError, resolve_sam

    if cfg.data and not Path(cfg.data).is_dir():  # inputs before --output_dir is claimed or a model loads
        raise FileNotFoundError(f"--data {cfg.data}: no such folder")
    try:
        resolve_sam(cfg.sam, cfg.sam_checkpoint)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(f"--sam: {err}") from err
    summary = train(cfg)
    if "checkpoint" in summary:
        b, a = summary.get("before", {}), summary.get("after", {})
        print(f"\ndone in {summary['wall_s']} s ({summary['steps']} steps, {summary['train_images']} images, "
              f"{summary['targets']} targets)")
        if a:
            print(f"  training images: loss {b['loss']:.4f} -> {a['loss']:.4f}; Dice of SAM's masks {b['dice']:.4f} -> "
                  f"{a['dice']:.4f}, of the generator's own masks {b['aux_dice']:.4f} -> {a['aux_dice']:.4f}")
        print(f"  generator: {summary['checkpoint']} (negdpo evaluate --segmenter prompt-free:{summary['checkpoint']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("seg_train", _run, argv)
