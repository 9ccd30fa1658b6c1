"""Negative-generator training: Diffusion-DPO (+ SDPO, masked-MI hinge, fidelity) or SFT on a LoRA, through Accelerate.

    accelerate launch gen_train.py [--config configs/demo.yaml] [--max_train_steps 100 ...]

One optimizer step = ``gradient_accumulation_steps`` micro-steps of ``train_batch_size`` pairs. Batches,
augmentation, timesteps and noise are drawn statelessly from (seed, step, micro-step, rank), so
``--resume_from_checkpoint latest`` continues with exactly the loss sequence of an uninterrupted run.
The scaffolding (output folder, checkpoints, resume, metrics, NaN guard) is :mod:`negdpo.core.training`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import GenTrainConfig  # noqa: F401  (the trainer's config lives beside it)
from .data import Curriculum, Pair, PairDataError, is_hf_dataset, load_pairs, to_tensors
from .pipeline import Components, encode_images, encode_prompts, latent_mask

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- batch
class PairBank:
    """In-memory pairs with optional cached VAE latents (both flip variants, so caching stays exact)."""

    def __init__(self, comp: Components, pairs: list[Pair], device: torch.device, cache: bool):
        self.comp, self.pairs, self.device = comp, pairs, device
        self.cache: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
        self._prompt_cache: dict[str, torch.Tensor] = {}
        if cache:
            for flip in (False, True):
                for start in range(0, len(pairs), 16):
                    idx = list(range(start, min(len(pairs), start + 16)))
                    lat = self._encode(idx, np.full(len(idx), flip))
                    for j, i in enumerate(idx):
                        self.cache[(i, flip)] = {k: v[j] for k, v in lat.items()}

    def _encode(self, idx: list[int], flips: np.ndarray) -> dict[str, torch.Tensor]:
        t = to_tensors([self.pairs[i] for i in idx], flips)
        t = {k: v.to(self.device) for k, v in t.items()}
        masked = t["source"] * (t["mask"] < 0.5)
        lat = {"chosen": encode_images(self.comp, t["chosen"]), "rejected": encode_images(self.comp, t["rejected"]),
               "masked": encode_images(self.comp, masked), "source": encode_images(self.comp, t["source"])}
        lat["mask"] = latent_mask(t["mask"], lat["chosen"].shape[-2:])
        return lat

    def latents(self, idx: list[int], flips: np.ndarray) -> dict[str, torch.Tensor]:
        if self.cache:
            items = [self.cache[(i, bool(f))] for i, f in zip(idx, flips)]
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return self._encode(idx, flips)

    def prompts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for text in texts:
            if text not in self._prompt_cache:
                self._prompt_cache[text] = encode_prompts(self.comp, [text], self.device)[0]
            out.append(self._prompt_cache[text])
        return torch.stack(out)


def draw_batch(bank: PairBank, cfg: GenTrainConfig, pool: np.ndarray, gen: torch.Generator) -> dict:
    """Indices, joint flips, prompt dropout, shared t and noise for one micro-batch, from ``gen``."""
    b = cfg.train_batch_size
    idx = pool[torch.randint(len(pool), (b,), generator=gen).numpy()].tolist()
    flips = (torch.rand(b, generator=gen) < cfg.hflip_prob).numpy()
    drop = (torch.rand(b, generator=gen) < cfg.proportion_empty_prompts).numpy()
    lat = bank.latents(idx, flips)
    t = torch.randint(0, bank.comp.noise_scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(lat["chosen"].shape, generator=gen)
    prompts = ["" if d else bank.pairs[i].prompt for i, d in zip(idx, drop)]
    return {**lat, "t": t.to(bank.device), "noise": noise.to(bank.device), "enc": bank.prompts(prompts), "idx": idx}


# -------------------------------------------------------------------------------------------- main
def _ensure_data(cfg: GenTrainConfig) -> None:
    data = Path(cfg.dataset_name)
    if cfg.make_phantoms and (not data.exists() or (data / "phantoms.json").is_file()):
        from negdpo.core.phantoms import ensure_phantoms

        ensure_phantoms(data, n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.seed, slices=2)
    if not data.exists():
        raise FileNotFoundError(f"--dataset_name {data} does not exist (pass a scan folder or a pair dataset, "
                                "or --make_phantoms to generate phantoms there)")


def _selfsup_pairs(cfg: GenTrainConfig, size: int) -> tuple[list[Pair], list[Pair]]:
    """Self-supervised repaint pairs (train, validation) of a scan folder; never reads twins."""
    from .selfsup import lesion_mask_bank, selfsup_pairs

    if is_hf_dataset(cfg.dataset_name):
        raise PairDataError(f"--dataset_name {cfg.dataset_name}: sft_source=healthy needs a scan folder "
                            "(it draws its own repaint masks), not a pair dataset")
    bank = lesion_mask_bank(cfg.dataset_name, cfg.train_split)
    kw = dict(bank=bank, per_image=cfg.selfsup_masks_per_image, seed=cfg.seed, margin=cfg.selfsup_margin)
    train_pairs = selfsup_pairs(cfg.dataset_name, cfg.train_split, size, limit=cfg.max_train_pairs, **kw)
    n_val = max(cfg.eval_pairs, cfg.num_validation_images)
    try:
        val_pairs = [p for split in cfg.val_split.split(",") if split.strip()
                     for p in selfsup_pairs(cfg.dataset_name, split.strip(), size, limit=n_val, **kw)][:n_val]
    except (ValueError, FileNotFoundError) as err:
        logger.warning("no validation pairs (%s); using training pairs for validation", err)
        val_pairs = train_pairs[:n_val]
    return train_pairs, val_pairs


def _load_pairs(cfg: GenTrainConfig, size: int) -> tuple[list[Pair], list[Pair]]:
    if cfg.train_method == "sft" and cfg.sft_source == "healthy":
        return _selfsup_pairs(cfg, size)
    include_healthy = cfg.train_method == "sft" and cfg.sft_include_healthy
    train_pairs = load_pairs(cfg.dataset_name, cfg.train_split, size, cfg.chosen_source, include_healthy,
                             cfg.max_train_pairs, cfg.reading())
    n_val = max(cfg.eval_pairs, cfg.num_validation_images)
    try:
        val_pairs = [p for split in cfg.val_split.split(",") if split.strip()
                     for p in load_pairs(cfg.dataset_name, split.strip(), size, cfg.chosen_source, False, n_val,
                                        cfg.reading())][:n_val]
    except (ValueError, FileNotFoundError) as err:
        logger.warning("no validation pairs (%s); using training pairs for validation", err)
        val_pairs = train_pairs[:n_val]
    return train_pairs, val_pairs


def train(cfg: GenTrainConfig) -> dict:
    """Run training; returns a summary dict (paths, metrics, wall time). Inputs are checked before the output
    folder is claimed; a run that fails before training releases the folder (``trainer_scope``)."""
    from negdpo.core.training import trainer_scope

    if not cfg.make_phantoms and not Path(cfg.dataset_name).exists():
        _ensure_data(cfg)  # the one-line error, before anything is written
    with trainer_scope():
        return _train(cfg)


def _train(cfg: GenTrainConfig) -> dict:
    from negdpo.core.config import derive_seed
    from negdpo.core.faults import fault_point
    from negdpo.core.training import (
        MetricsLog,
        NonFiniteGuard,
        finish_run,
        make_optimizer,
        make_scheduler,
        resume_step,
        save_checkpoint,
        start_run,
        update,
    )
    from tqdm.auto import tqdm

    from .lora_io import load_lora_into, model_card, save_lora
    from .objective import compute_loss, heldout_record, implicit_accuracy
    from .pipeline import UNetReference, add_lora, load_components
    from .validation import validation_grid

    if cfg.train_method == "onpolicy":
        raise ValueError("train_method=onpolicy is a loop of sampling, judging and DPO rounds: run it with "
                         "`gen_train.py --train_method onpolicy` (negdpo.onpolicy.run_onpolicy)")
    t_start = time.time()
    run = start_run(cfg, "generator", owner="gen_train")
    accelerator, out = run.accelerator, run.out
    with accelerator.main_process_first():
        _ensure_data(cfg)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    comp = load_components(cfg.pretrained_model_name_or_path, cfg.reference_adapter, cfg.reference_mode)
    size = cfg.resolution or int(comp.unet.config.sample_size) * int(comp.pipe.vae_scale_factor)
    train_pairs, val_pairs = _load_pairs(cfg, size)  # inputs checked before the UNet is moved or wrapped
    unet = comp.unet
    if weight_dtype == torch.float32:  # casting to the dtype it already has only triggers a diffusers warning
        unet.to(device)
        comp.text_encoder.to(device)
    else:
        unet.to(device, dtype=weight_dtype)
        comp.text_encoder.to(device, dtype=weight_dtype)
    comp.vae.to(device)  # VAE stays fp32 (fp16 VAEs overflow)
    if cfg.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()  # raises a clear error when xformers is missing
    params = add_lora(unet, cfg.rank, cfg.lora_alpha, [s.strip() for s in cfg.lora_targets.split(",")], cfg.lora_init)
    reference = None
    if cfg.train_method == "dpo":
        mode = "adapter" if cfg.reference_adapter and cfg.reference_mode == "adapter" else cfg.reference
        ref_unet = None
        if mode == "model":
            ref_unet = load_components(cfg.reference_model).unet.to(device, dtype=weight_dtype).eval()
        reference = UNetReference(unet, mode, ref_unet)
        reference.policy_setup()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    bank = PairBank(comp, train_pairs, device, cfg.cache_latents)
    val_bank = PairBank(comp, val_pairs[: cfg.eval_pairs], device, cache=True)
    curriculum = Curriculum([p.difficulty for p in train_pairs], cfg.curriculum_stages, cfg.curriculum_every)
    optimizer = make_optimizer(params, cfg)
    lr_scheduler = make_scheduler(optimizer, cfg, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_lora(accelerator.unwrap_model(model), Path(output_dir))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            load_lora_into(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    global_step = resume_step(run, cfg)
    metrics_log = MetricsLog(run, global_step)
    summary: dict = {"output_dir": str(out)}
    before_file = out / "heldout_before.json"
    if cfg.train_method == "dpo" and cfg.eval_pairs > 0:
        if global_step == 0 or not before_file.exists():
            summary["heldout_before"] = implicit_accuracy(comp, base_unet, reference, val_bank, cfg, cfg.eval_draws)
            if run.is_main:
                before_file.write_text(json.dumps(summary["heldout_before"]))
        else:
            summary["heldout_before"] = heldout_record(json.loads(before_file.read_text()))
        accelerator.print(f"held-out implicit accuracy before training: {summary['heldout_before']}")

    guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, desc="gen_train",
                    disable=not accelerator.is_local_main_process)
    rank = accelerator.process_index
    grid_path = None
    while global_step < cfg.max_train_steps:
        pool = curriculum.pool(global_step)
        step_metrics: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            gen = torch.Generator().manual_seed(derive_seed("batch", global_step, micro, rank, base=cfg.seed))
            batch = draw_batch(bank, cfg, pool, gen)
            with accelerator.accumulate(unet):
                loss, metrics, _ = compute_loss(comp, unet, reference, batch, cfg)
                grad_norm = update(run, loss, params, optimizer, lr_scheduler, guard, cfg, global_step)
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        global_step += 1
        progress.update(1)
        step_metrics.update(lr=lr_scheduler.get_last_lr()[0], curriculum_stage=curriculum.stage(global_step - 1))
        progress.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                             acc=f"{step_metrics.get('rewards/accuracies', float('nan')):.2f}")
        fault_point("step_end", global_step)
        if global_step % cfg.logging_steps == 0 or global_step == cfg.max_train_steps:
            metrics_log.log(global_step, step_metrics)
        fault_point("after_log", global_step)
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(run, global_step, cfg.checkpoints_total_limit)
        is_val = cfg.validation_steps and (global_step % cfg.validation_steps == 0 or global_step == cfg.max_train_steps)
        if is_val and accelerator.is_main_process and cfg.num_validation_images > 0:
            grid_path = out / "validation" / f"step_{global_step:06d}.png"
            grid = validation_grid(comp, base_unet, reference, val_pairs[: cfg.num_validation_images], cfg, grid_path)
            shutil.copyfile(grid_path, out / "preview.png")
            _log_image(accelerator, grid, global_step)
    progress.close()

    accelerator.wait_for_everyone()
    if cfg.train_method == "dpo" and cfg.eval_pairs > 0:
        summary["heldout_after"] = implicit_accuracy(comp, base_unet, reference, val_bank, cfg, cfg.eval_draws)
        accelerator.print(f"held-out implicit accuracy after training: {summary['heldout_after']}")
        accelerator.log({f"heldout/{k}": v for k, v in summary["heldout_after"].items()}, step=global_step)
    fault_point("final", global_step)
    if accelerator.is_main_process:
        save_lora(base_unet, out, base_model=cfg.pretrained_model_name_or_path)
        meta = {"base_model": cfg.pretrained_model_name_or_path, "train_method": cfg.train_method,
                "reference_adapter": _relative_to(cfg.reference_adapter, out) if cfg.reference_adapter else None,
                "rank": cfg.rank, "steps": global_step}
        (out / "negdpo_adapter.json").write_text(json.dumps(meta, indent=1))
        held = {k: summary[k] for k in ("heldout_before", "heldout_after") if k in summary}
        (out / "README.md").write_text(model_card(cfg, held, adapter_dir=out))
        summary.update(adapter=str(out / "pytorch_lora_weights.safetensors"), logs=str(out / "logs"),
                       metrics=str(metrics_log.path), preview=str(out / "preview.png") if grid_path else None,
                       steps=global_step, wall_s=round(time.time() - t_start, 1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    finish_run(run)
    return summary


def _relative_to(path: str, out: Path) -> str:
    """``path`` relative to ``out`` (so a moved pair of run folders still loads), else absolute."""
    import os

    try:
        return os.path.relpath(Path(path).resolve(), out.resolve())
    except ValueError:  # another drive
        return str(Path(path).resolve())


def _log_image(accelerator, grid: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": grid}, step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid)}, step=step)
