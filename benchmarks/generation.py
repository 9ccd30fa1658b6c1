"""Negative generation (inpainting with CFG): images/s, share of time outside the UNet, per speed option.

    python benchmarks/generation.py                                   # tiny preset, 64 px, CPU
    python benchmarks/generation.py --model sd15-inpaint-random --size 512 --steps 20 --device cuda

Options, each measured against ``baseline`` (fp32, diffusers' default SDPA attention):
``no_sdpa`` (diffusers' classic attention: what SDPA buys), ``channels_last`` (UNet memory format),
``bf16`` (pipeline in bfloat16), ``compile`` (``torch.compile`` of the UNet; compile time reported apart),
``xformers`` (memory-efficient attention; recorded as skipped where xformers is not installed / no CUDA).
Random weights: speed only. Writes ``benchmarks/results/generation_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("baseline", "no_sdpa", "channels_last", "bf16", "compile", "xformers")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class UNetClock:
    """Forward time of one module (synchronising CUDA around each call)."""

    def __init__(self, module, device: str) -> None:
        self.device, self.seconds, self.calls, self._t0 = device, 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_) -> None:
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


def measure(model: str, variant: str, device: str = "cpu", size: int = 64, steps: int = 20, guidance: float = 7.5,
            images: int = 1) -> dict:
    """Generate ``images`` inpaintings once (after a 2-step warm-up) with one speed option."""
    import numpy as np
    import torch
    from negdpo.core.models import load_inpaint_pipeline
    from PIL import Image

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    pipe = load_inpaint_pipeline(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if variant == "no_sdpa":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
    elif variant == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
    elif variant == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as err:  # not installed, or no CUDA: a measured "cannot run here"
            return {"variant": variant, "skipped": f"{type(err).__name__}: {str(err)[:160]}"}
    elif variant == "compile":
        pipe.unet = torch.compile(pipe.unet)
    clock = UNetClock(pipe.unet, device)
    img = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = 255
    kwargs = dict(image=[img] * images, mask_image=[Image.fromarray(mask)] * images, height=size, width=size,
                  guidance_scale=guidance, output_type="np")
    prompt = ["A T1-weighted axial brain MRI with no tumour."] * images
    t0 = time.perf_counter()
    pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up (+compile)
    _sync(device)
    warmup = time.perf_counter() - t0
    clock.seconds, clock.calls = 0.0, 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).images
    _sync(device)
    wall = time.perf_counter() - t0
    row = {"variant": variant, "size": size, "steps": steps, "guidance": guidance, "images": images,
           "img_per_s": round(images / wall, 4), "s_per_img": round(wall / images, 3),
           "unet_share": round(clock.seconds / wall, 3), "outside_unet_share": round(1 - clock.seconds / wall, 3),
           "unet_calls": clock.calls, "warmup_s": round(warmup, 2), "finite": bool(np.isfinite(out).all())}
    if device.startswith("cuda"):
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = [measure(a.model, v, a.device, a.size, a.steps, a.guidance, a.images) for v in a.variants.split(",")]
    for r in rows:
        print(json.dumps(r))
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"generation_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "device": a.device, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
