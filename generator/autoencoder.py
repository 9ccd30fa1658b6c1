"""Modality adaptation of the generator's autoencoder (AutoencoderKL) on a scan folder.

A random-init preset (``tiny``) has a VAE that does not reconstruct anything, so no UNet trained on its
latents can produce a plausible scan; a natural-image VAE (SD) reconstructs MRI/ultrasound imperfectly.
``adapt_autoencoder`` fine-tunes the pipeline's VAE on the folder's images (train split, its healthy twins
and ``negatives/``; never val/test) with L1 + MSE reconstruction and a small KL term, re-estimates the
latent ``scaling_factor`` (1 / std of the latents, as SD did) and writes a complete diffusers pipeline
folder (original components + adapted VAE, safetensors) usable anywhere a model name goes::

    out = adapt_autoencoder("tiny", "data/phantoms", "outputs/vae/tiny-phantoms", steps=300)
    load_generator(out);  accelerate launch gen_train.py --pretrained_model <out>

    python -m negdpo.generator.autoencoder --model tiny --data data/phantoms --out outputs/vae/tiny-phantoms --max_train_steps 300

The folder is written to a temporary sibling and renamed when complete; rerunning with the same settings
returns the existing folder (``negdpo_autoencoder.json`` records settings and the held-out PSNR before/after).

Formulas and sources: docs/method.md#autoencoder-adaptation.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.config import parse_flags, underscore_flags

logger = logging.getLogger(__name__)
STAMP = "negdpo_autoencoder.json"
HELDOUT_SPLITS = ("val", "test")


def _to_rgb(image: np.ndarray, size: int) -> np.ndarray:
    from .data import _rgb

    return _rgb(image, size)


def collect_images(data: str | Path, size: int, splits: tuple[str, ...] = ("train",), twins: bool = True,
                   negatives: bool = True) -> np.ndarray:
    """(N, S, S, 3) float [0,1]: the images of ``splits`` (+ their ``*_twins``) and ``negatives/``."""
    from negdpo.core.imageio import pad_to_square, read_scan
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(data, on_error="skip", read_twins=twins)
    paths: list[Path] = []
    for split in splits:
        if not (folder.root / f"{split}_images").is_dir():
            continue
        paths += folder.image_files(split)
        tw = folder.root / f"{split}_twins"
        if twins and tw.is_dir():
            paths += sorted(p for p in tw.iterdir() if p.suffix.lower() == ".png")
    if negatives:
        paths += folder.negatives()
    images = []
    for p in paths:
        try:
            images.append(_to_rgb(pad_to_square(read_scan(p)), size))  # padded, never stretched
        except Exception as err:  # an unreadable file is reported, not silently dropped
            logger.warning("autoencoder: skipping %s (%s)", p, err)
    if not images:
        raise FileNotFoundError(f"{data}: no images for autoencoder adaptation in splits {list(splits)}"
                                f"{' or negatives/' if negatives else ''}")
    return np.stack(images).astype(np.float32)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2.0 - 1.0


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16,
                        sample: bool = False, seed: int = 0) -> float:
    """Mean PSNR (dB, [0,1] range, per image then averaged) of VAE reconstructions (posterior mode by default)."""
    vae_was_training = vae.training
    vae.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    psnrs = []
    x_all = _tensor(images)
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device) if sample else dist.mode()
        rec = vae.decode(z).sample.clamp(-1, 1)
        mse = (((rec - x) / 2.0) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs += (10.0 * torch.log10(1.0 / mse)).tolist()
    vae.train(vae_was_training)
    return float(np.mean(psnrs))


@torch.no_grad()
def latent_scaling_factor(vae, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 32) -> float:
    """1 / std of the unscaled posterior-mode latents over ``images`` (how SD's 0.18215 was chosen)."""
    zs = [vae.encode(_tensor(images[i:i + batch_size]).to(device)).latent_dist.mode().float().cpu()
          for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(zs).std().clamp_min(1e-6))


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
              device: torch.device | str = "cpu", kl_weight: float = 1e-6, l1_weight: float = 1.0,
              mse_weight: float = 1.0, hflip: bool = True, vflip: bool = False, sample_posterior: bool = True,
              log_every: int = 50) -> list[float]:
    """Fine-tune ``vae`` in place; batches, flips and posterior noise come from a seeded generator."""
    vae.to(device).train()
    vae.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
                                                                     * 0.9 + 0.1))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = _tensor(images)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=gen)
        x = data[idx]
        if hflip:
            f = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
        if vflip:
            f = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(f[:, None, None, None], x.flip(-2), x)
        x = x.to(device)
        dist = vae.encode(x).latent_dist
        if sample_posterior:
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        else:
            z = dist.mode()
        rec = vae.decode(z).sample
        loss = l1_weight * F.l1_loss(rec, x) + mse_weight * F.mse_loss(rec, x)
        if kl_weight > 0:
            loss = loss + kl_weight * dist.kl().mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            logger.info("autoencoder step %d/%d loss %.4f", step + 1, steps, np.mean(losses[-log_every:]))
    vae.requires_grad_(False)
    vae.eval()
    return losses


def _settings(model: str, data: str, steps: int, batch_size: int, lr: float, seed: int, **extra) -> dict:
    return {"model": model, "data": str(Path(data).resolve()), "steps": int(steps), "batch_size": int(batch_size),
            "lr": float(lr), "seed": int(seed), **extra}


def adapt_autoencoder(model: str, data: str, out: str, steps: int = 400, batch_size: int = 8, lr: float = 3e-3,
                      seed: int = 0, device: torch.device | str = "cpu", *, kl_weight: float = 1e-6,
                      hflip: bool = True, vflip: bool = False, size: int | None = None,
                      rescale_latents: bool = True, overwrite: bool = False, twins: bool = True,
                      heldout_splits: tuple[str, ...] = HELDOUT_SPLITS) -> str:
    """Fine-tune ``model``'s AutoencoderKL on ``data``; write a full diffusers pipeline to ``out``; return ``out``.

    Training images: the train split, its healthy twins (``twins=False``: none, nothing under ``*_twins/`` is
    read) and ``negatives/``. Held-out PSNR (posterior mode, ``heldout_splits`` images, default val+test)
    before/after is stored in ``out/negdpo_autoencoder.json``. With ``rescale_latents``
    the VAE's ``scaling_factor`` is re-estimated so the scaled latents have unit std. If ``out`` already
    holds a complete folder with the same settings it is returned as is (``overwrite`` forces a rebuild).
    """
    from negdpo.core.config import seed_everything
    from negdpo.core.models import load_inpaint_pipeline

    out_path = Path(out)
    settings = _settings(model, data, steps, batch_size, lr, seed, kl_weight=kl_weight, hflip=hflip, vflip=vflip,
                         size=size, rescale_latents=rescale_latents, **({} if twins else {"twins": False}))
    stamp = out_path / STAMP
    if not overwrite and out_path.exists():
        if stamp.is_file() and (out_path / "model_index.json").is_file():
            if json.loads(stamp.read_text()).get("settings") == json.loads(json.dumps(settings)):
                logger.info("autoencoder: %s is complete with the same settings; reusing it", out_path)
                return str(out_path)
            raise FileExistsError(f"{out_path} holds an adapted pipeline with different settings; "
                                  "pass overwrite=True (--overwrite) or another --out")
        if any(out_path.iterdir()):
            raise FileExistsError(f"{out_path} exists and is not an adapted pipeline folder; pass overwrite=True "
                                  "(--overwrite) or another --out")
    elif overwrite and out_path.is_dir() and any(out_path.iterdir()) and not stamp.is_file():
        raise FileExistsError(f"{out_path}: not an adapted pipeline folder written by negdpo, so it is not "
                              "replaced or deleted; choose another --out (or empty it yourself)")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"{data}: scan folder does not exist")
    t0 = time.time()
    seed_everything(seed)
    pipe = load_inpaint_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    size = int(size or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor))
    train_images = collect_images(data, size, ("train",), twins=twins, negatives=True)
    try:
        heldout = collect_images(data, size, heldout_splits, twins=False, negatives=False)
    except FileNotFoundError:
        heldout = None
        logger.warning("autoencoder: no val/test images in %s; PSNR is measured on training images", data)
    eval_images = heldout if heldout is not None else train_images
    vae = pipe.vae.to(device).float()
    psnr_before = reconstruction_psnr(vae, eval_images, device)
    losses = train_vae(vae, train_images, steps, batch_size, lr, seed, device, kl_weight=kl_weight, hflip=hflip,
                       vflip=vflip)
    psnr_after = reconstruction_psnr(vae, eval_images, device)
    psnr_train = reconstruction_psnr(vae, train_images, device)
    old_sf = float(vae.config.scaling_factor)
    new_sf = latent_scaling_factor(vae, train_images, device) if rescale_latents else old_sf
    vae.register_to_config(scaling_factor=new_sf)
    vae.to("cpu")
    pipe.vae = vae
    record = {"settings": settings, "n_train_images": len(train_images),
              "n_heldout_images": 0 if heldout is None else len(heldout), "size": size,
              "psnr_heldout_before": round(psnr_before, 3), "psnr_heldout_after": round(psnr_after, 3),
              "psnr_train_after": round(psnr_train, 3), "scaling_factor_before": old_sf, "scaling_factor": new_sf,
              "final_loss": float(np.mean(losses[-20:])) if losses else None, "wall_s": round(time.time() - t0, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}-", dir=out_path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / STAMP).write_text(json.dumps(record, indent=1))
        if out_path.exists():
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("autoencoder: held-out PSNR %.2f -> %.2f dB in %.1f s; wrote %s", psnr_before, psnr_after,
                record["wall_s"], out_path)
    return str(out_path)


def read_record(folder: str | Path) -> dict:
    """The ``negdpo_autoencoder.json`` record of an adapted pipeline folder."""
    return json.loads((Path(folder) / STAMP).read_text())


PROG = "python -m negdpo.generator.autoencoder"
RENAMED_FLAGS = {"--steps": "--max_train_steps"}  # old flag -> new (deprecated alias for one release)


def _parser() -> argparse.ArgumentParser:
    from negdpo.core.console import CommandParser

    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | hub id | diffusers folder")
    p.add_argument("--data", required=True, help="scan folder (train split + negatives/ are used)")
    p.add_argument("--out", required=True, help="output diffusers pipeline folder")
    p.add_argument("--max_train_steps", type=int, default=400, help="optimisation steps")
    p.add_argument("--batch_size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed (batches, flips, posterior noise)")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term next to the reconstruction loss")
    p.add_argument("--no_hflip", action="store_true", help="no random horizontal flips")
    p.add_argument("--vflip", action="store_true", help="also random vertical flips")
    p.add_argument("--size", type=int, default=None, help="training resolution (default: the UNet's native size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no_twins", action="store_true", help="train on no healthy twin (nothing in *_twins/ is read)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    return underscore_flags(p)


def _main(argv: list[str]) -> int:
    args = parse_flags(_parser(), argv, RENAMED_FLAGS)
    out = adapt_autoencoder(args.model, args.data, args.out, args.max_train_steps, args.batch_size, args.lr, args.seed,
                            args.device, kl_weight=args.kl_weight, hflip=not args.no_hflip, vflip=args.vflip,
                            size=args.size, overwrite=args.overwrite, twins=not args.no_twins)
    rec = read_record(out)
    print(f"adapted autoencoder: held-out PSNR {rec['psnr_heldout_before']:.2f} -> {rec['psnr_heldout_after']:.2f} dB "
          f"({rec['n_train_images']} training images, {rec['wall_s']} s); scaling_factor {rec['scaling_factor']:.4f}")
    print(f"  pipeline: {out}  (use it as --pretrained_model / load_generator('{out}'))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (bad flag, missing data or model, a refused --out): one line and exit 2."""
    from negdpo.core.console import run_main

    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
