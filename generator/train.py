"""Training loop: Diffusion-DPO (+ SDPO, masked-MI hinge, fidelity) or SFT on a LoRA, through Accelerate.

    accelerate launch gen_train.py [--config configs/demo.yaml] [--max_train_steps 100 ...]

One optimizer step = ``gradient_accumulation_steps`` micro-steps of ``train_batch_size`` pairs. Batches,
augmentation, timesteps and noise are drawn statelessly from (seed, step, micro-step, rank), so
``--resume_from_checkpoint latest`` continues with exactly the loss sequence of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from negdpo.core.checkpoints import latest_checkpoint, prune_checkpoints

from .data import Curriculum, Pair, load_pairs, to_tensors
from .lora_io import load_lora_into, model_card, save_lora
from .losses import (
    diffusion_dpo_loss,
    fidelity_loss,
    noise_coefs,
    per_sample_error,
    scale_gradient,
    sdpo_lambda,
    training_target,
    x0_from_prediction,
)
from .mi import mi_hinge, outside_weight
from .pipeline import (
    Components,
    Reference,
    add_lora,
    encode_images,
    encode_prompts,
    latent_mask,
    load_components,
    unet_input,
)

logger = logging.getLogger(__name__)


@dataclass
class GenTrainConfig:
    """Run config (YAML via --config, flags override). Beta uses the convention WITH the 1/2 (losses.py)."""

    # data and model
    pretrained_model: str = field(default="tiny", metadata={"help": "tiny | tiny-txt2img | hub id | diffusers folder"})
    data: str = field(default="data/phantoms", metadata={"help": "scan folder or HF pair dataset (save_to_disk/parquet)"})
    make_phantoms: bool = field(default=False, metadata={"help": "generate phantoms into --data if it is absent"})
    phantom_n: int = 24
    phantom_size: int = 64
    train_split: str = "train"
    val_split: str = field(default="val", metadata={"help": "held-out split(s), comma-separated (e.g. val,test)"})
    chosen_source: str = field(default="auto", metadata={"help": "scan folders: auto | twin | classical"})
    max_train_pairs: int | None = None
    resolution: int = field(default=0, metadata={"help": "training resolution in px (0 = the UNet's native size)"})
    output_dir: str = field(default="", metadata={"help": "default: outputs/generator/<run_name>"})
    run_name: str = "demo"
    seed: int = 0
    # method
    train_method: str = field(default="dpo", metadata={"help": "dpo | sft"})
    beta: float = field(default=5000.0, metadata={"help": "DPO beta, convention WITH the 1/2 (diffusers SD1.5 2500 = 5000)"})
    loss_type: str = "sigmoid"
    mask_weighted_error: bool = True
    mask_dilate_latent: int = 1
    outside_gamma: float = 0.0
    sdpo: bool = True
    sdpo_mu: float = 0.9
    mi_weight: float = 0.0
    mi_bins: int = 23
    mi_t_max: int = 500
    mi_dilate_latent: int = 1
    fidelity_weight: float = 0.0
    proportion_empty_prompts: float = 0.0
    hflip_prob: float = 0.5
    curriculum_stages: int = 1
    curriculum_every: int = 0
    sft_include_healthy: bool = True
    # reference
    reference: str = field(default="disable_adapters", metadata={"help": "disable_adapters | adapter | model"})
    reference_adapter: str | None = field(default=None, metadata={"help": "SFT adapter folder used as reference"})
    reference_mode: str = field(default="fuse", metadata={"help": "fuse (into base) | adapter (named)"})
    reference_model: str | None = field(default=None, metadata={"help": "explicit frozen reference (reference=model)"})
    # LoRA
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    lora_init: str = "gaussian"
    # optimisation
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 100
    mixed_precision: str | None = field(default=None, metadata={"help": "no | fp16 | bf16 (default: accelerate config)"})
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    # checkpoints, logging, validation
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir or 'latest'"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | all | none"})
    tracker_project: str = "negdpo-generator"
    logging_steps: int = 1
    validation_steps: int = 0
    num_validation_images: int = 4
    validation_inference_steps: int = 10
    eval_pairs: int = 16
    eval_draws: int = 4


class NonFiniteLossError(RuntimeError):
    """Raised after the state was saved when a loss became NaN/inf."""


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


# -------------------------------------------------------------------------------------------- loss
def compute_loss(comp: Components, unet: torch.nn.Module, reference: Reference | None, batch: dict,
                 cfg: GenTrainConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One micro-batch: (total loss, metrics, aux). aux holds the stacked t/noise and predictions."""
    sched = comp.noise_scheduler
    pred_type = comp.prediction_type
    t, noise = batch["t"], batch["noise"]
    weight_dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    if cfg.train_method == "sft":
        x0 = batch["chosen"]
        noisy = sched.add_noise(x0, noise, t)
        inp = unet_input(comp, noisy, batch["mask"], batch["masked"]).to(weight_dtype)
        pred = unet(inp, t, batch["enc"].to(weight_dtype)).sample
        a, s = noise_coefs(sched.alphas_cumprod, t)
        target = training_target(noise, x0, a, s, pred_type)
        loss = per_sample_error(pred, target).mean()
        return loss, {"loss": loss.detach(), "sft_mse": loss.detach()}, {"t": t, "noise": noise}
    b = t.shape[0]
    x0 = torch.cat([batch["chosen"], batch["rejected"]])
    t2, noise2 = t.repeat(2), noise.repeat(2, 1, 1, 1)  # identical t and eps for both members of a pair
    noisy = sched.add_noise(x0, noise2, t2)
    inp = unet_input(comp, noisy, batch["mask"].repeat(2, 1, 1, 1), batch["masked"].repeat(2, 1, 1, 1)).to(weight_dtype)
    enc = batch["enc"].repeat(2, 1, 1).to(weight_dtype)
    if reference is None:
        raise ValueError("DPO needs a reference")
    with torch.no_grad(), reference.active() as ref_unet:
        ref_pred = ref_unet(inp, t2, enc).sample
    pred = unet(inp, t2, enc).sample  # adapters enabled again (matters with gradient checkpointing)
    a, s = noise_coefs(sched.alphas_cumprod, t2)
    target = training_target(noise2, x0, a, s, pred_type)
    m2 = batch["mask"].repeat(2, 1, 1, 1)
    weight = None
    if cfg.mask_weighted_error:
        k = cfg.mask_dilate_latent
        weight = torch.nn.functional.max_pool2d(m2, 2 * k + 1, 1, k) if k > 0 else m2
    model_err = per_sample_error(pred, target, weight, cfg.outside_gamma)
    ref_err = per_sample_error(ref_pred, target, weight, cfg.outside_gamma)
    err_w, err_l = model_err[:b], model_err[b:]
    metrics: dict[str, torch.Tensor] = {}
    if cfg.sdpo:
        lam = sdpo_lambda(pred[:b], target[:b], pred[b:], target[b:], cfg.sdpo_mu, None if weight is None else weight[:b])
        err_l = scale_gradient(err_l, lam)
        metrics["sdpo_lambda"] = lam.detach()
    loss, dpo_metrics = diffusion_dpo_loss(err_w, err_l, ref_err[:b], ref_err[b:], cfg.beta, cfg.loss_type)
    metrics.update(dpo_metrics)
    metrics["dpo_loss"] = loss.detach()
    total = loss
    if cfg.mi_weight > 0 or cfg.fidelity_weight > 0:
        x0_pol = x0_from_prediction(pred[:b], noisy[:b], a[:b], s[:b], pred_type)
        x0_ref = x0_from_prediction(ref_pred[:b], noisy[:b], a[:b], s[:b], pred_type)
        out_w = outside_weight(batch["mask"], cfg.mi_dilate_latent)
        gate = (t < cfg.mi_t_max).float() * a[:b] ** 2  # timestep gating: only low t, weighted by abar_t
        if cfg.mi_weight > 0:
            l_mi, mi_metrics = mi_hinge(x0_pol, x0_ref, batch["source"], out_w, gate, num_bins=cfg.mi_bins)
            total = total + cfg.mi_weight * l_mi
            metrics.update(mi_metrics)
        if cfg.fidelity_weight > 0:
            l_fid = fidelity_loss(x0_pol, batch["source"], out_w, gate, x0_ref)
            total = total + cfg.fidelity_weight * l_fid
            metrics["fidelity"] = l_fid.detach()
    metrics["loss"] = total.detach()
    z = -0.5 * cfg.beta * ((model_err[:b] - ref_err[:b]) - (model_err[b:] - ref_err[b:])).detach()
    return total, metrics, {"z": z, "t": t2, "noise": noise2, "pred": pred, "ref_pred": ref_pred, "target": target}


@torch.no_grad()
def implicit_accuracy(comp: Components, unet: torch.nn.Module, reference: Reference, bank: PairBank,
                      cfg: GenTrainConfig, draws: int = 4, seed: int = 1234) -> dict[str, float]:
    """Held-out implicit accuracy (strict z > 0 and ties-half) over fixed (t, eps) draws per pair."""
    import dataclasses

    from negdpo.core.config import derive_seed

    ecfg = dataclasses.replace(cfg, sdpo=False, mi_weight=0.0, fidelity_weight=0.0, train_method="dpo",
                               train_batch_size=1)
    zs = []
    was_training = unet.training
    unet.eval()
    items = [(i, d) for i in range(len(bank.pairs)) for d in range(draws)]
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        lat = bank.latents([i for i, _ in chunk], np.zeros(len(chunk), bool))
        enc = bank.prompts([bank.pairs[i].prompt for i, _ in chunk])
        ts, noises = [], []
        for i, d in chunk:
            gen = torch.Generator().manual_seed(derive_seed("eval", i, d, base=seed))
            ts.append(torch.randint(0, comp.noise_scheduler.config.num_train_timesteps, (1,), generator=gen))
            noises.append(torch.randn(lat["chosen"].shape[1:], generator=gen))
        batch = {**lat, "t": torch.cat(ts).to(bank.device), "noise": torch.stack(noises).to(bank.device), "enc": enc}
        _, _, aux = compute_loss(comp, unet, reference, batch, dataclasses.replace(ecfg, train_batch_size=len(chunk)))
        zs.extend(aux["z"].tolist())
    unet.train(was_training)
    z = np.asarray(zs)
    return {"implicit_acc": float((z > 0).mean()), "implicit_acc_ties_half": float((z > 0).mean() + 0.5 * (z == 0).mean()),
            "margin_mean": float(z.mean()), "n": len(z)}


# ------------------------------------------------------------------------------------- validation
def validation_grid(comp: Components, unet: torch.nn.Module, reference: Reference | None, pairs: list[Pair],
                    cfg: GenTrainConfig, path: Path) -> np.ndarray:
    """Rows: source | mask | policy output | reference output | chosen (target fill). Saved as PNG."""
    from negdpo.core.imageio import to_gray
    from negdpo.core.phantoms import write_grid

    from .sample import inpaint

    pipe = comp.pipe
    was_training = unet.training
    unet.eval()
    images = [p.source for p in pairs]
    masks = [p.mask for p in pairs]
    prompts = [p.prompt for p in pairs]
    seeds = [cfg.seed + i for i in range(len(pairs))]
    kw = dict(steps=cfg.validation_inference_steps, paste_back=False, size=images[0].shape[0], scheduler="ddim")
    original_unet = pipe.unet
    pipe.unet = unet
    try:
        policy = inpaint(pipe, images, masks, prompts, seeds, **kw)
        if reference is not None:
            with reference.active() as ref_unet:
                pipe.unet = ref_unet
                ref = inpaint(pipe, images, masks, prompts, seeds, **kw)
        else:
            ref = [np.zeros_like(x) for x in policy]
    finally:
        pipe.unet = original_unet
        unet.train(was_training)
    rows = [[to_gray(p.source), p.mask.astype(np.float32), to_gray(po), to_gray(r), to_gray(p.chosen)]
            for p, po, r in zip(pairs, policy, ref)]
    write_grid(path, rows)
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# -------------------------------------------------------------------------------------------- main
def _ensure_data(cfg: GenTrainConfig) -> None:
    data = Path(cfg.data)
    if cfg.make_phantoms and (not data.exists() or (data / "phantoms.json").is_file()):
        from negdpo.core.phantoms import ensure_phantoms

        ensure_phantoms(data, n=cfg.phantom_n, size=cfg.phantom_size, seed=cfg.seed, slices=2)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist (pass a scan folder / pair dataset, or --make_phantoms)")


def train(cfg: GenTrainConfig) -> dict:
    """Run training; returns a summary dict (paths, metrics, wall time)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from negdpo.core.config import derive_seed, save_config, seed_everything, tracker_config
    from tqdm.auto import tqdm

    t_start = time.time()
    if cfg.train_method not in ("dpo", "sft"):
        raise ValueError(f"train_method must be 'dpo' or 'sft', got '{cfg.train_method}'")
    out = Path(cfg.output_dir or _default_out(cfg))
    log_with = None if cfg.report_to in ("none", "", None) else cfg.report_to
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    seed_everything(cfg.seed)
    with accelerator.main_process_first():
        _ensure_data(cfg)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    comp = load_components(cfg.pretrained_model, cfg.reference_adapter, cfg.reference_mode)
    size = cfg.resolution or int(comp.unet.config.sample_size) * int(comp.pipe.vae_scale_factor)
    unet = comp.unet
    unet.to(device, dtype=weight_dtype)
    comp.vae.to(device)  # VAE stays fp32 (fp16 VAEs overflow)
    comp.text_encoder.to(device, dtype=weight_dtype)
    params = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, [s.strip() for s in cfg.lora_targets.split(",")], cfg.lora_init)
    reference = None
    if cfg.train_method == "dpo":
        mode = cfg.reference
        if cfg.reference_adapter and cfg.reference_mode == "adapter":
            mode = "adapter"
        ref_unet = None
        if mode == "model":
            if not cfg.reference_model:
                raise ValueError("reference=model needs --reference_model")
            ref_unet = load_components(cfg.reference_model).unet.to(device, dtype=weight_dtype).eval()
        reference = Reference(unet, mode, ref_unet)
        reference.policy_setup()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    include_healthy = cfg.train_method == "sft" and cfg.sft_include_healthy
    train_pairs = load_pairs(cfg.data, cfg.train_split, size, cfg.chosen_source, include_healthy, cfg.max_train_pairs)
    try:
        n_val = max(cfg.eval_pairs, cfg.num_validation_images)
        val_pairs = [p for split in cfg.val_split.split(",") if split.strip()
                     for p in load_pairs(cfg.data, split.strip(), size, cfg.chosen_source, False, n_val)][:n_val]
    except (ValueError, FileNotFoundError) as err:
        logger.warning("no validation pairs (%s); using training pairs for validation", err)
        val_pairs = train_pairs[: max(cfg.eval_pairs, cfg.num_validation_images)]
    bank = PairBank(comp, train_pairs, device, cfg.cache_latents)
    val_bank = PairBank(comp, val_pairs[: cfg.eval_pairs], device, cache=True)
    curriculum = Curriculum([p.difficulty for p in train_pairs], cfg.curriculum_stages, cfg.curriculum_every)

    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            optimizer_cls = bnb.optim.AdamW8bit
        except ImportError:
            logger.warning("bitsandbytes not installed; using torch.optim.AdamW")
    optimizer = optimizer_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
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

    global_step = 0
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint == "latest":
            path = latest_checkpoint(out)
        if path is None:
            accelerator.print(f"no checkpoint in {out}; starting a new run")
        elif not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path} does not exist")
        else:
            accelerator.print(f"resuming from {path}")
            accelerator.load_state(str(path))
            global_step = int(path.name.split("-")[-1])

    if accelerator.is_main_process and log_with:
        accelerator.init_trackers(cfg.tracker_project, config=tracker_config(cfg))
    log_path = out / "train_log.jsonl"
    summary: dict = {"output_dir": str(out)}
    if cfg.train_method == "dpo" and global_step == 0 and cfg.eval_pairs > 0:
        summary["heldout_before"] = implicit_accuracy(comp, base_unet, reference, val_bank, cfg, cfg.eval_draws)
        accelerator.print(f"held-out implicit accuracy before training: {summary['heldout_before']}")

    def save_checkpoint(step: int) -> Path:
        ckpt = out / f"checkpoint-{step}"
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process and cfg.checkpoints_total_limit:
            prune_checkpoints(out, cfg.checkpoints_total_limit)
        return ckpt

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
                finite = bool(torch.isfinite(accelerator.gather(loss.detach().reshape(1))).all())
                if not finite:
                    ckpt = save_checkpoint(global_step)
                    accelerator.end_training()
                    raise NonFiniteLossError(
                        f"loss became {float(loss)} at step {global_step + 1} (micro-step {micro}); state of step "
                        f"{global_step} saved to {ckpt}. Lower --learning_rate/--beta or use fp32/bf16, then "
                        f"--resume_from_checkpoint {ckpt}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    metrics["grad_norm"] = torch.as_tensor(grad_norm).detach().float()
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        global_step += 1
        progress.update(1)
        step_metrics.update(lr=lr_scheduler.get_last_lr()[0], curriculum_stage=curriculum.stage(global_step - 1))
        progress.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                             acc=f"{step_metrics.get('implicit_acc', float('nan')):.2f}")
        if global_step % max(1, cfg.logging_steps) == 0:
            accelerator.log(step_metrics, step=global_step)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": global_step, **step_metrics}) + "\n")
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0 and global_step < cfg.max_train_steps:
            save_checkpoint(global_step)
        is_val = cfg.validation_steps and (global_step % cfg.validation_steps == 0 or global_step == cfg.max_train_steps)
        if is_val and accelerator.is_main_process and cfg.num_validation_images > 0:
            grid_path = out / "validation" / f"step_{global_step:06d}.png"
            grid = validation_grid(comp, base_unet, reference, val_pairs[: cfg.num_validation_images], cfg, grid_path)
            shutil.copyfile(grid_path, out / "preview.png")
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({"validation": grid}, step=global_step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({"validation": wandb.Image(grid)}, step=global_step)
    progress.close()

    accelerator.wait_for_everyone()
    if cfg.train_method == "dpo" and cfg.eval_pairs > 0:
        summary["heldout_after"] = implicit_accuracy(comp, base_unet, reference, val_bank, cfg, cfg.eval_draws)
        accelerator.print(f"held-out implicit accuracy after training: {summary['heldout_after']}")
        accelerator.log({f"heldout/{k}": v for k, v in summary["heldout_after"].items()}, step=global_step)
    if accelerator.is_main_process:
        save_lora(base_unet, out)
        meta = {"base_model": cfg.pretrained_model, "train_method": cfg.train_method,
                "reference_adapter": str(Path(cfg.reference_adapter).resolve()) if cfg.reference_adapter else None,
                "lora_rank": cfg.lora_rank, "steps": global_step}
        (out / "negdpo_adapter.json").write_text(json.dumps(meta, indent=1))
        held = {k: summary[k] for k in ("heldout_before", "heldout_after") if k in summary}
        (out / "README.md").write_text(model_card(cfg, held))
        summary.update(adapter=str(out / "pytorch_lora_weights.safetensors"), logs=str(out / "logs"),
                       train_log=str(log_path), preview=str(out / "preview.png") if grid_path else None,
                       steps=global_step, wall_s=round(time.time() - t_start, 1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.end_training()
    return summary


def _default_out(cfg: GenTrainConfig) -> Path:
    from negdpo.core.config import default_output_dir

    return default_output_dir("generator", cfg.run_name)


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.config import bundled_config, parse_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = parse_config(GenTrainConfig, argv, default_config=str(bundled_config("demo.yaml")))
    try:
        summary = train(cfg)
    except NonFiniteLossError as err:
        print(f"gen_train: stopped: {err}")
        return 3
    if "adapter" in summary:
        print(f"\ndone in {summary['wall_s']} s ({summary['steps']} steps)")
        print(f"  adapter : {summary['adapter']}")
        print(f"  logs    : {summary['logs']} (tensorboard --logdir {summary['logs']}); per-step: {summary['train_log']}")
        if summary.get("preview"):
            print(f"  preview : {summary['preview']} (source | mask | policy | reference | healthy target)")
        if "heldout_after" in summary:
            b, a = summary.get("heldout_before", {}), summary["heldout_after"]
            print(f"  held-out implicit accuracy: {b.get('implicit_acc', float('nan')):.3f} -> {a['implicit_acc']:.3f}")
    return 0
