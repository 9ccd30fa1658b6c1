"""BiomedCLIP preference training through Accelerate: CLIP-DPO (baseline DHN-NCE; + attention entropy;
+ mask-aware OT stages; + retention), full fine-tune / locked towers / LoRA, checkpoint + resume.

    accelerate launch clip_train.py                      # configs/clip_demo.yaml (phantoms, tiny model)
    accelerate launch clip_train.py --config configs/clip_demo.yaml --loss dpo+entropy --max_train_steps 200

``loss`` is a '+'-joined mix of: ``dpo``, ``dhn_nce``, ``entropy``, ``stages``, ``clip`` (retention).
The output folder gets ``checkpoint-*/`` (Accelerate state), ``final/`` (open_clip ``local-dir:``),
``metrics.jsonl``, ``summary.json``, ``tsne.png`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import model as cm
from .attention import attention_entropy, attention_mask_pull, capture_attention
from .config import LOSS_PARTS, ClipTrainConfig  # noqa: F401  (the trainer's config lives beside it)
from .data import ClipPairDataset, load_pairs, make_collate
from .distributed import gather_ids, gather_with_grad
from .losses import clip_contrastive_loss, clip_dpo_pair_loss, dhn_nce_loss
from .ot import curriculum_weight, two_stage_loss

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- setup
def resolve_data(cfg: ClipTrainConfig, out: Path) -> Path:
    if cfg.dataset_name:
        return Path(cfg.dataset_name)
    from negdpo.core.phantoms import ensure_phantoms

    return ensure_phantoms(out.parent / f"phantoms_n{cfg.phantoms_n}_s{cfg.phantoms_size}_seed{cfg.phantoms_seed}",
                           n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.phantoms_seed, slices=2, preview=False)


def build_model(cfg: ClipTrainConfig):
    """(policy, preprocess, tokenizer, logit scale value)."""
    from negdpo.core.models import load_clip

    model, preprocess, tokenizer = load_clip(cfg.pretrained_model_name_or_path)
    if cfg.disable_dropout:
        cm.disable_dropout(model)
    scale = float(model.logit_scale.detach().exp())
    if cfg.freeze_logit_scale:
        model.logit_scale.requires_grad_(False)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.requires_grad_(False)
    if cfg.finetune == "lock_image":
        cm.lock_towers(model, True, False)
    elif cfg.finetune == "lock_text":
        cm.lock_towers(model, False, True)
    elif cfg.finetune == "lora":
        model = cm.apply_lora(model, cfg.lora_towers, cfg.rank, cfg.lora_alpha)
    elif cfg.finetune != "full":
        raise ValueError(f"finetune '{cfg.finetune}': use full | lock_image | lock_text | lora")
    model.train()
    return model, preprocess, tokenizer, scale


def _ref_is_cacheable(preprocess) -> bool:
    names = {type(t).__name__ for t in getattr(preprocess, "transforms", [])}
    return not any(n.startswith("Random") or "Augment" in n for n in names)


@torch.no_grad()
def cache_reference(ref: cm.CLIPReference, dataset: ClipPairDataset, collate, scale: float, batch_size: int,
                    device: torch.device) -> None:
    """TRL-style precompute: unshuffled pass through the reference, stored as ``ref_sims`` on the pairs."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out = []
    for batch in loader:
        out.append(ref.sims(batch["pos"].to(device), batch["neg"].to(device), batch["texts"].to(device), scale).cpu())
    dataset.set_ref_sims(torch.cat(out))


# --------------------------------------------------------------------------------------------------- steps
def compute_loss(cfg: ClipTrainConfig, parts: set[str], model, ref: cm.CLIPReference | None, batch: dict,
                 scale: float, step: int, autocast=nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and metrics for one batch."""
    blocks = [int(b) for b in cfg.entropy_blocks.split(",")]
    need_tokens = "stages" in parts
    capture = capture_attention(cm.unwrap(model), blocks) if "entropy" in parts else None
    with autocast():
        if capture is not None:
            with capture as rec:
                sims, feats = cm.pair_sims(model, batch["pos"], batch["neg"], batch["texts"], scale, need_tokens)
        else:
            sims, feats = cm.pair_sims(model, batch["pos"], batch["neg"], batch["texts"], scale, need_tokens)
    sims = sims.float()
    total = sims.new_zeros(())
    logs: dict[str, float] = {}
    b = sims.shape[0]
    if "dpo" in parts:
        if "ref_sims" in batch:
            ref_sims = batch["ref_sims"].to(sims)
        else:
            ref_sims = ref.sims(batch["pos"], batch["neg"], batch["texts"], scale, autocast)
        dirs = tuple(d.strip() for d in cfg.dpo_directions.split(",") if d.strip())
        loss, m = clip_dpo_pair_loss(sims, ref_sims, cfg.beta, cfg.loss_type, cfg.label_smoothing, dirs)
        total = total + loss
        logs["loss/dpo"] = float(loss.detach())
        logs |= {k: float(v) for k, v in m.items()}
    img, txt = feats["img"].float().reshape(2 * b, -1), feats["txt"].float().reshape(2 * b, -1)
    if {"dhn_nce", "clip"} & parts:  # image-caption pairs (x+_0, y+_0), (x-_0, y-_0), ... (interleaved rows)
        texts = batch["texts"]
        if cfg.gather_with_grad:  # negatives from every process (open_clip's --gather-with-grad)
            img, txt = gather_with_grad(img), gather_with_grad(txt)
        ids = gather_ids(texts) if cfg.gather_with_grad else torch.unique(texts, dim=0, return_inverse=True)[1]
        ids = ids if cfg.dedup_captions else None  # identical captions are one caption, not negatives
    if "dhn_nce" in parts:
        loss = dhn_nce_loss(img, txt, cfg.dhn_temperature, cfg.dhn_alpha, cfg.dhn_beta1, cfg.dhn_beta2, cfg.dhn_mode,
                            text_ids=ids)
        total = total + loss
        logs["loss/dhn_nce"] = float(loss.detach())
    if "clip" in parts and cfg.retention_weight > 0:
        ls = cm.unwrap(model).logit_scale
        kappa = ls.exp().clamp(max=100.0) if ls.requires_grad else scale  # learnt when not frozen (open_clip)
        loss = clip_contrastive_loss(img, txt, kappa, ids)
        total = total + cfg.retention_weight * loss
        logs["loss/retention"] = float(loss.detach())
    if capture is not None:
        probs = rec.stacked().float()  # (blocks, 2B, heads, N, N)
        ent = attention_entropy(probs, rec.num_prefix_tokens)
        loss = cfg.entropy_weight * ent.mean()
        logs["attention/entropy"] = float(ent.detach().mean())
        if cfg.entropy_mask_weight > 0:
            pm = torch.cat([batch["patch_mask"], torch.zeros_like(batch["patch_mask"])]).to(probs)
            pull = attention_mask_pull(probs, pm, rec.num_prefix_tokens)[:b].mean()
            loss = loss + cfg.entropy_mask_weight * pull
            logs["attention/mask_ce"] = float(pull.detach())
        total = total + loss
    if need_tokens:
        tok = feats["tokens"].float()
        w2 = curriculum_weight(step, cfg.max_train_steps, cfg.curriculum_start, cfg.curriculum_end)
        loss, m = two_stage_loss(tok[:b], batch["patch_mask"].to(tok), tok[b:], w2, cfg.ot_reg,
                                 cfg.stage_temperature, cfg.ot_weight)
        total = total + cfg.stages_weight * loss
        logs["loss/stages"] = float(loss.detach())
        logs |= m
    logs["loss"] = float(total.detach())
    return total, logs


@torch.no_grad()
def evaluate(model, ref: cm.CLIPReference | None, dataset: ClipPairDataset, collate, scale: float, cfg: ClipTrainConfig,
             device: torch.device, collect_tokens: bool = False) -> tuple[dict[str, float], dict]:
    """Held-out preference accuracy / margins (absolute and vs reference), R@1, attention entropy."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)
    sims, refs, ents, imgs, txts, toks, masks = [], [], [], [], [], [], []
    for batch in loader:
        pos, neg, texts = batch["pos"].to(device), batch["neg"].to(device), batch["texts"].to(device)
        with capture_attention(cm.unwrap(model), (-1,)) as rec:
            s, f = cm.pair_sims(cm.unwrap(model), pos, neg, texts, scale, with_tokens=collect_tokens)
        ents.append(attention_entropy(rec.stacked(), rec.num_prefix_tokens).cpu())
        sims.append(s.float().cpu())
        imgs.append(f["img"].cpu())
        txts.append(f["txt"].cpu())
        if collect_tokens:
            toks.append(f["tokens"][: pos.shape[0]].float().cpu())
            masks.append(batch["patch_mask"])
        if ref is not None:
            refs.append(ref.sims(pos, neg, texts, scale).cpu())
    model.train(was_training)
    sims_t = torch.cat(sims)
    ref_t = torch.cat(refs) if refs else torch.zeros_like(sims_t)
    _, m = clip_dpo_pair_loss(sims_t, ref_t, cfg.beta, "sigmoid")
    out = {f"eval/{k}": float(v) for k, v in m.items() if k.startswith(("preference", "t2i/pref", "i2t/pref"))
           or (ref is not None and k.startswith(("rewards", "t2i/rewards", "i2t/rewards")))}
    out["eval/attention_entropy"] = float(torch.cat(ents).mean())
    out |= retrieval_r1(torch.cat(imgs), torch.cat(txts), [p for p in dataset.pairs])
    extra = {"tokens": torch.cat(toks).numpy(), "masks": torch.cat(masks).numpy()} if collect_tokens else {}
    return out, extra


def retrieval_r1(img: torch.Tensor, txt: torch.Tensor, pairs) -> dict[str, float]:
    """R@1 over images {x+, x-} and the distinct caption strings (duplicate captions count as one)."""
    captions = [c for p in pairs for c in (p.text_pos, p.text_neg)]
    images = img.reshape(-1, img.shape[-1])
    texts_all = txt.reshape(-1, txt.shape[-1])
    uniq: dict[str, int] = {}
    for i, c in enumerate(captions):
        uniq.setdefault(c, i)
    names = list(uniq)
    t = texts_all[list(uniq.values())]
    s = images @ t.T
    i2t = np.mean([names[j] == captions[i] for i, j in enumerate(s.argmax(1).tolist())])
    t2i = np.mean([captions[i] == names[j] for j, i in enumerate(s.argmax(0).tolist())])
    return {"eval/r1_i2t": float(i2t), "eval/r1_t2i": float(t2i)}


# --------------------------------------------------------------------------------------------------- main
class StepBatches:
    """Batch sampler for steps ``start..``: shuffled epochs drawn from (seed, epoch) alone, so resume is exact."""

    def __init__(self, n: int, cfg: ClipTrainConfig, start_step: int, world: int, rank: int) -> None:
        self.n, self.cfg, self.world, self.rank = n, cfg, world, rank
        self.start = start_step * cfg.gradient_accumulation_steps
        self.stop = cfg.max_train_steps * cfg.gradient_accumulation_steps

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        from negdpo.core.training import epoch_batches

        for flat in range(self.start, self.stop):
            yield epoch_batches(self.n, self.cfg.train_batch_size, flat, self.cfg.seed, self.world, self.rank)


def train(cfg: ClipTrainConfig) -> dict:
    """Run one training; returns the summary (also written to ``output_dir/summary.json``)."""
    from negdpo.core.training import trainer_scope

    threads = torch.get_num_threads()
    try:
        with trainer_scope():  # a run that fails before training releases its folder
            return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ClipTrainConfig) -> dict:
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
        step_seed,
        update,
    )
    from tqdm.auto import tqdm

    parts = cfg.parts()
    if cfg.dataset_name and not Path(cfg.dataset_name).exists():  # before any model loads
        raise FileNotFoundError(f"--dataset_name {cfg.dataset_name}: no such folder")
    run = start_run(cfg, "clip", owner="clip_train")
    accelerator, out = run.accelerator, run.out
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("mixed_precision fp16 has no effect on the CPU (Accelerate's autocast stays fp32 there): this "
                       "run trains in fp32; use --mixed_precision bf16 for reduced precision on the CPU, or a GPU")
    with accelerator.main_process_first():
        data = resolve_data(cfg, out)

    model, preprocess, tokenizer, scale = build_model(cfg)
    grid = cm.grid_size(model)
    collate = make_collate(tokenizer)
    train_ds = ClipPairDataset(load_pairs(data, cfg.train_split, cfg.negative_text, cfg.reading()), preprocess, grid)
    val_ds = ClipPairDataset(load_pairs(data, cfg.val_split, cfg.negative_text, cfg.reading()), preprocess, grid)
    world = accelerator.num_processes
    if len(train_ds) < cfg.train_batch_size * world:
        raise ValueError(f"{len(train_ds)} training pairs < train_batch_size {cfg.train_batch_size} x {world} processes")
    device = accelerator.device
    model.to(device)

    # the reference also scores validation (implicit rewards), so it exists for every loss
    ref = cm.CLIPReference(model, use_adapter_disable=cfg.finetune == "lora")
    if ref.copy is not None:
        ref.copy.to(device)
    ref_mode = cfg.ref_mode
    if "dpo" in parts:
        if ref_mode == "auto":
            ref_mode = "cached" if _ref_is_cacheable(preprocess) else "on_the_fly"
        if ref_mode == "cached":
            if not _ref_is_cacheable(preprocess):
                raise ValueError("ref_mode=cached needs deterministic preprocessing (no random transforms)")
            cache_reference(ref, train_ds, collate, scale, cfg.eval_batch_size, device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, world)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = resume_step(run, cfg)
    metrics_log = MetricsLog(run, step)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=StepBatches(len(train_ds), cfg, step, world, accelerator.process_index),
        collate_fn=collate, num_workers=cfg.dataloader_num_workers)

    autocast = accelerator.autocast
    before_file = out / "eval_before.json"
    before, before_extra = evaluate(model, ref, val_ds, collate, scale, cfg, device, collect_tokens=cfg.tsne)
    if step > 0 and before_file.exists():  # a resumed run reports the metrics of the untrained start
        before = json.loads(before_file.read_text())
    elif run.is_main:
        before_file.write_text(json.dumps(before))
    accelerator.log({k.replace("eval/", "eval_before/"): v for k, v in before.items()}, step=step)
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="clip_train",
               disable=not (cfg.progress_bar and accelerator.is_local_main_process))
    guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
    t0, n_samples, last = time.perf_counter(), 0, {}
    micro = 0
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(step_seed(cfg.seed, step, micro, accelerator.process_index))  # dropout etc.
        with accelerator.accumulate(model):
            loss, logs = compute_loss(cfg, parts, model, ref, batch, scale, step, autocast)
            grad_norm = update(run, loss, params, optimizer, scheduler, guard, cfg, step)
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
        n_samples += batch["pos"].shape[0]
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step, micro = step + 1, 0
        bar.update(1)
        logs |= {"lr": scheduler.get_last_lr()[0], "logit_scale": float(cm.unwrap(model).logit_scale.detach().exp()),
                 "samples_per_s": n_samples / (time.perf_counter() - t0)}
        last = logs
        fault_point("step_end", step)
        if step % cfg.logging_steps == 0 or step == cfg.max_train_steps:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            metrics_log.log(step, logs)
        fault_point("after_log", step)
        if cfg.validation_steps and step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
            ev, _ = evaluate(model, ref, val_ds, collate, scale, cfg, device)
            accelerator.log(ev, step=step)
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            save_checkpoint(run, step, cfg.checkpoints_total_limit)
    bar.close()
    train_time = time.perf_counter() - t0
    after, after_extra = evaluate(model, ref, val_ds, collate, scale, cfg, device, collect_tokens=cfg.tsne)
    accelerator.log(after, step=step)
    summary = {"steps": step, "loss": cfg.loss, "finetune": cfg.finetune, "ref_mode": ref_mode,
               "train_pairs": len(train_ds), "val_pairs": len(val_ds), "train_seconds": round(train_time, 2),
               "samples_per_s": round(n_samples * world / max(train_time, 1e-9), 2), "logit_scale": scale,
               "before": before, "after": after, "last_step": last}
    accelerator.wait_for_everyone()
    fault_point("final", step)
    if run.is_main:
        if cfg.tsne and before_extra:
            from .tsne import lesion_background_points, plot_tsne

            pb = lesion_background_points(before_extra["tokens"], before_extra["masks"], cfg.tsne_max_points, seed=cfg.seed)
            pa = lesion_background_points(after_extra["tokens"], after_extra["masks"], cfg.tsne_max_points, seed=cfg.seed)
            summary["tsne_silhouette"] = plot_tsne({"before": pb, "after": pa}, out / "tsne.png", seed=cfg.seed)
        if cfg.save_final:
            cm.save_clip_checkpoint(accelerator.unwrap_model(model), cfg.pretrained_model_name_or_path, out / "final")
            summary["checkpoint"] = str((out / "final").resolve())
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    finish_run(run)
    return summary
