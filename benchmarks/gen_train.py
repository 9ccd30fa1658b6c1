"""Diffusion-DPO generator training step: pairs/s and peak memory per configuration.

    python benchmarks/gen_train.py                 # tiny UNet on CPU (64 px)  -> benchmarks/results/gen_train_cpu.json
    python benchmarks/gen_train.py --real          # the sd15-inpaint-random preset's UNet, 512 px, GPU
                                                   # (bf16, batch 4/8, grad ckpt on/off, adapter toggle vs 2nd UNet)

Measures the UNet part of one optimizer step (reference forward under no_grad + policy forward +
backward + AdamW step) with cached latents / text embeddings, i.e. what the training loop does with
``--cache_latents``. Random weights: speed and memory only.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path

import torch
from negdpo.generator.losses import diffusion_dpo_loss, per_sample_error
from negdpo.generator.pipeline import add_lora


def make_unet(real: bool):
    """The UNet of ``sd15-inpaint-random`` (real) or ``tiny``, through diffusers' own loader."""
    from diffusers import UNet2DConditionModel
    from negdpo.core.models import resolve_diffusion

    unet = UNet2DConditionModel.from_pretrained(resolve_diffusion("sd15-inpaint-random" if real else "tiny"),
                                                subfolder="unet")
    return unet, int(unet.config.cross_attention_dim), 77


def bench(real: bool, batch: int, dtype: torch.dtype, grad_ckpt: bool, reference: str, steps: int, warmup: int,
          device: str, full_ft: bool = False, resolution: int | None = None, optimizer: str = "adamw") -> dict:
    """One optimizer step's UNet work; ``resolution`` in px (default: the UNet's native size).

    ``optimizer="sgd"`` (no optimizer state) is for machines where a full fine-tune's AdamW state does not fit:
    its step time is a lower bound on the AdamW step's."""
    unet, ctx_dim, seq = make_unet(real)
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    ref_unet = None
    if full_ft:
        if reference != "model":
            raise ValueError("a full fine-tune needs a second frozen UNet as reference")
        ref_unet = copy.deepcopy(unet).eval()
        unet.float().requires_grad_(True)
        params = list(unet.parameters())
    else:
        params = add_lora(unet, rank=8)
        if reference == "model":
            ref_unet = copy.deepcopy(unet)
            ref_unet.disable_adapters()
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    opt = (torch.optim.SGD(params, lr=1e-5) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda"))
    factor = 8 if real else 4  # VAE downsampling of the preset
    lat = resolution // factor if resolution else int(unet.config.sample_size)
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(2 * batch, 4, lat, lat, generator=g).to(device)
    cond = torch.randn(2 * batch, 5, lat, lat, generator=g).to(device)
    enc = torch.randn(2 * batch, seq, ctx_dim, generator=g).to(device, dtype)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> float:
        t = torch.randint(0, 1000, (batch,), device=device).repeat(2)
        noise = torch.randn(batch, 4, lat, lat, device=device).repeat(2, 1, 1, 1)
        inp = torch.cat([x0 + noise, cond], 1).to(dtype)
        with autocast:
            with torch.no_grad():
                if ref_unet is not None:
                    ref = ref_unet(inp, t, enc).sample
                else:
                    unet.disable_adapters()
                    ref = unet(inp, t, enc).sample
                    unet.enable_adapters()
            pred = unet(inp, t, enc).sample
        e, r = per_sample_error(pred, noise), per_sample_error(ref, noise)
        loss, _ = diffusion_dpo_loss(e[:batch], e[batch:], r[:batch], r[batch:], 5000.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"model": "sd15-inpaint-random" if real else "tiny", "device": device, "batch_pairs": batch,
            "resolution": lat * factor,
            "dtype": str(dtype).replace("torch.", ""), "grad_ckpt": grad_ckpt, "reference": reference,
            "train": "full" if full_ft else "lora-r8", "optimizer": optimizer, "pairs_per_s": float(f"{batch * steps / dt:.4g}"),
            "s_per_step": round(dt / steps, 4), "peak_mem_gib": round(peak, 2),
            "peak_mem_kind": "cuda max_allocated" if device == "cuda" else "process max RSS (cumulative)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="SD-1.5-inpainting-sized UNet at 512 px (needs a GPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.real and device != "cuda":
        p.error("--real needs a CUDA GPU")
    if args.real:
        configs = [dict(batch=b, dtype=torch.bfloat16, grad_ckpt=gc, reference=ref)
                   for b in (4, 8) for gc in (False, True) for ref in ("disable_adapters", "model")]
        configs.append(dict(batch=8, dtype=torch.bfloat16, grad_ckpt=False, reference="model", full_ft=True))
        steps, warmup = args.steps or 20, args.warmup or 5
    else:
        configs = [dict(batch=b, dtype=torch.float32, grad_ckpt=gc, reference=ref)
                   for b in (2, 4) for gc in (False, True) for ref in ("disable_adapters", "model")]
        steps, warmup = args.steps or 5, args.warmup or 1
    rows = []
    for c in configs:
        rows.append(bench(args.real, c["batch"], c["dtype"], c["grad_ckpt"], c["reference"], steps, warmup, device,
                          c.get("full_ft", False)))
        r = rows[-1]
        print(f"{r['model']:>18} {r['train']:>7} b={r['batch_pairs']} {r['dtype']:>8} ckpt={str(r['grad_ckpt']):5} "
              f"ref={r['reference']:>16}  {r['pairs_per_s']:8.2f} pairs/s  {r['s_per_step']:.3f} s/step  "
              f"peak {r['peak_mem_gib']:.2f} GiB", flush=True)
    out = Path(args.out or f"benchmarks/results/gen_train_{'gpu' if args.real else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "steps": steps, "warmup": warmup}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
