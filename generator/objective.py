"""The generator's training objective on one micro-batch (Diffusion-DPO + SDPO + masked MI + fidelity, or SFT)
and the held-out implicit accuracy. Formulas: docs/method.md#diffusion-dpo."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
from .pipeline import Components, UNetReference, unet_input


def compute_loss(comp: Components, unet: torch.nn.Module, reference: UNetReference | None, batch: dict,
                 cfg: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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
        lam = sdpo_lambda(pred[:b], target[:b], pred[b:], target[b:], cfg.sdpo_mu,
                          None if weight is None else weight[:b], outside_gamma=cfg.outside_gamma)
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


def heldout_record(record: dict[str, Any]) -> dict[str, Any]:
    """A held-out accuracy record read back from disk, in today's names: files written before the rename
    call the strict accuracy ``implicit_acc`` (it is ``implicit_acc_strict`` now)."""
    if "implicit_acc" in record and "implicit_acc_strict" not in record:
        record = {"implicit_acc_strict": record["implicit_acc"], **{k: v for k, v in record.items()
                                                                     if k != "implicit_acc"}}
    return record


@torch.no_grad()
def implicit_accuracy(comp: Components, unet: torch.nn.Module, reference: UNetReference, bank: Any,
                      cfg: Any, draws: int = 4, seed: int = 1234) -> dict[str, float]:
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
    return {"implicit_acc_strict": float((z > 0).mean()),
            "implicit_acc_ties_half": float((z > 0).mean() + 0.5 * (z == 0).mean()),
            "margin_mean": float(z.mean()), "n": len(z)}
