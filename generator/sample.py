"""Turn positives + lesion masks into tumour-free negatives with a (LoRA-adapted) inpainting generator.

    pipe = load_generator("tiny", adapter="outputs/generator/demo")
    outs = inpaint(pipe, images, masks, prompts, seeds=[0, 1, ...], steps=20)

``negdpo sample --data DIR --split test --generator tiny [--adapter PATH] --out OUT`` does the same for a
scan folder and writes ``OUT/<name>.png`` plus ``OUT/preview.png`` (source | mask | output).

Every image gets its own ``torch.Generator`` seeded from ``seeds[i]``, so an image's output does not
depend on which other images share its batch (up to floating-point batching noise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from negdpo.core.config import parse_flags, underscore_flags
from negdpo.core.fill import INITS
from PIL import Image

from .lora_io import LORA_WEIGHT_NAME, load_adapter

logger = logging.getLogger(__name__)

ADAPTER_META = "negdpo_adapter.json"  # optional: {"reference_adapter": <folder>} fused before this adapter
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a short name (see ``SCHEDULERS``) or class name; else ValueError."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
    if cls is None:
        raise ValueError(f"unknown scheduler '{name}'; choose one of {sorted(SCHEDULERS)} or a diffusers class")
    return cls


def set_scheduler(pipe, name: str | None) -> None:
    """Swap the pipeline's scheduler by short name (see ``SCHEDULERS``) or diffusers class name."""
    if name:
        pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)


def _check_no_reference(folder: Path) -> None:
    """An adapter folder without ``negdpo_adapter.json``: refuse it when its model card names a reference adapter
    (it would load without the adapter it was trained on top of), else say that none is loaded."""
    card = folder / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    found = re.search(r"Reference adapter: `([^`]*)`", text)
    ref = found.group(1) if found and not found.group(1).startswith("none") else None
    run_config = folder.parent / "config.yaml"  # a checkpoint-N folder inside its run folder
    if ref is None and folder.name.startswith("checkpoint-") and run_config.is_file():
        import yaml

        with contextlib.suppress(yaml.YAMLError, AttributeError):
            ref = (yaml.safe_load(run_config.read_text()) or {}).get("reference_adapter") or None
    if ref:
        raise FileNotFoundError(f"{folder}: no {ADAPTER_META}, but it was trained on top of the reference adapter "
                                f"'{ref}'; restore {ADAPTER_META} (it names that folder) so the reference is loaded "
                                "first, or load the run folder's final adapter")
    logger.warning("%s: no %s; loading it on the base model alone (no reference adapter)", folder, ADAPTER_META)


def adapter_chain(adapter: str | Path) -> list[Path]:
    """The adapter plus (first) any reference adapter it was trained on top of (SFT -> DPO)."""
    folder = Path(adapter)
    if folder.is_file():
        folder = folder.parent
    if not (folder / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{folder}: no {LORA_WEIGHT_NAME} (expected a generator run's output folder)")
    chain = [folder]
    meta = folder / ADAPTER_META
    if not meta.is_file():
        _check_no_reference(folder)
    while meta.is_file():
        ref = json.loads(meta.read_text()).get("reference_adapter")
        if not ref:
            break
        ref_dir = Path(ref)
        if not ref_dir.is_absolute() and not (ref_dir / LORA_WEIGHT_NAME).is_file():
            ref_dir = meta.parent / ref_dir  # relative to the adapter folder (a moved pair of run folders)
        if not (ref_dir / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"{meta}: reference adapter '{ref}' has no {LORA_WEIGHT_NAME}")
        if ref_dir in chain:
            raise ValueError(f"{meta}: reference adapter chain loops at {ref_dir}")
        chain.insert(0, ref_dir)
        meta = ref_dir / ADAPTER_META
    return chain


def load_generator(model: str = "tiny", adapter: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """``StableDiffusionInpaintPipeline`` for ``model`` (tiny / hub id / folder) with an optional LoRA adapter.

    ``adapter`` is a folder holding ``pytorch_lora_weights.safetensors`` (a ``gen_train.py`` output), loaded
    with ``load_lora_weights`` and checked tensor by tensor (``lora_io.load_adapter``). If it was trained on
    top of a reference (SFT) adapter, that one is fused into the base first, as in training.
    A 4-channel UNet runs in the pipeline's legacy blending mode (img2img-style inpainting).
    """
    from negdpo.core.models import load_inpaint_pipeline

    pipe = load_inpaint_pipeline(model, torch_dtype=dtype)
    if adapter:
        chain = adapter_chain(adapter)
        for i, folder in enumerate(chain):
            name = f"negdpo_{i}"
            load_adapter(pipe, folder, name)  # load_lora_weights, then every tensor checked
            if i < len(chain) - 1:  # reference adapters are part of the base the policy was trained on
                pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[name])
                pipe.unload_lora_weights()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(pipe) -> int:
    """Training resolution of the pipeline's UNet in pixels (512 for SD-1.5, 64 for ``tiny``)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def _to_pil_rgb(image: np.ndarray, size: int) -> Image.Image:
    arr = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be (H,W) or (H,W,3), got shape {arr.shape}")
    pil = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")
    return pil if pil.size == (size, size) else pil.resize((size, size), Image.BICUBIC)


def _to_pil_mask(mask: np.ndarray, size: int) -> Image.Image:
    pil = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255, "L")
    return pil if pil.size == (size, size) else pil.resize((size, size), Image.NEAREST)


def _back_to_input(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """(S,S,3) float output -> the input's (H,W) shape and channel layout."""
    h, w = like.shape[:2]
    if out.shape[:2] != (h, w):
        pil = Image.fromarray((np.clip(out, 0, 1) * 255.0 + 0.5).astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
        out = np.asarray(pil, np.float32) / 255.0
    out = out.astype(np.float32)
    return out.mean(axis=-1) if like.ndim == 2 else out


def paste_back_blend(source: np.ndarray, output: np.ndarray, mask: np.ndarray, seam_px: float = 2.0) -> np.ndarray:
    """``output`` inside ``mask``, ``source`` exactly outside it, blended over a ``seam_px``-wide band inside.

    The weight of the output is ``min(1, d / seam_px)`` with ``d`` the Euclidean distance (px) of a mask
    pixel to the nearest pixel outside the mask (border pixels: d = 1); ``seam_px <= 1`` is a hard paste.
    """
    from scipy import ndimage

    src = np.clip(np.asarray(source, np.float32), 0.0, 1.0)
    out = np.asarray(output, np.float32)
    m = np.asarray(mask, bool)
    if out.shape != src.shape or m.shape != src.shape[:2]:
        raise ValueError(f"paste_back_blend: shapes differ (source {src.shape}, output {out.shape}, mask {m.shape})")
    w = np.clip(ndimage.distance_transform_edt(m) / max(float(seam_px), 1.0), 0.0, 1.0).astype(np.float32)
    if src.ndim == 3:
        w = w[..., None]
    return np.where(w > 0, w * out + (1.0 - w) * src, src).astype(np.float32)


def inpaint(pipe, images: list[np.ndarray], masks: list[np.ndarray], prompts: list[str], seeds: list[int], *,
            steps: int = 20, guidance_scale: float = 1.0, strength: float = 1.0, init: str = "source",
            scheduler: str | None = None, paste_back: bool = True, seam_px: float = 2.0, size: int | None = None,
            batch_size: int = 8) -> list[np.ndarray]:
    """Repaint the masked region of each image; returns float [0,1] arrays shaped like the inputs.

    images: float [0,1] (H,W) or (H,W,3); masks: bool (H,W), True = repaint. Images are resized to
    ``size`` (default: the UNet's native resolution) for the model and back afterwards. With
    ``paste_back`` (the default) the source is kept exactly outside the mask, with a soft seam of
    ``seam_px`` pixels inside it (:func:`paste_back_blend`). ``guidance_scale`` <= 1 disables CFG.

    ``init`` is the image the sampler starts from, noised to ``strength`` (diffusers' img2img rule; at
    ``strength`` 1 every init is pure noise): ``source`` (the positive itself) or ``harmonic`` (the positive
    with the mask filled by :func:`negdpo.core.fill.classical_fill`: SDEdit from a classical fill, which
    anchors the fill's brightness while the model repaints the texture; docs/method.md#sampling-start).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (got {init!r})")
    n = len(images)
    if not (len(masks) == len(prompts) == len(seeds) == n):
        raise ValueError(f"images/masks/prompts/seeds lengths differ: {n}, {len(masks)}, {len(prompts)}, {len(seeds)}")
    for i, (img, m) in enumerate(zip(images, masks)):
        if np.asarray(m).shape != np.asarray(img).shape[:2]:
            raise ValueError(f"item {i}: mask shape {np.asarray(m).shape} != image shape {np.asarray(img).shape[:2]}")
    set_scheduler(pipe, scheduler)
    size = int(size or native_size(pipe))
    multiple = int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if size % multiple:
        raise ValueError(f"size {size} must be a multiple of {multiple} for this model")
    if init == "harmonic":
        from negdpo.core.fill import classical_fill

        starts = [classical_fill(np.clip(np.asarray(img, np.float32), 0.0, 1.0), m, dilate=0)
                  for img, m in zip(images, masks)]
    else:
        starts = list(images)
    results: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        gens = [torch.Generator(device="cpu").manual_seed(int(seeds[i])) for i in idx]
        with torch.inference_mode():
            out = pipe(prompt=[prompts[i] or "" for i in idx],
                       image=[_to_pil_rgb(starts[i], size) for i in idx],
                       mask_image=[_to_pil_mask(masks[i], size) for i in idx],
                       height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                       strength=strength, generator=gens, output_type="np").images
        for j, i in enumerate(idx):
            res = _back_to_input(np.asarray(out[j]), np.asarray(images[i]))
            if paste_back:
                res = paste_back_blend(images[i], res, masks[i], seam_px)
            results.append(np.clip(res, 0.0, 1.0).astype(np.float32))
    return results


RENAMED_FLAGS = {"--steps": "--sample_steps"}  # old flag -> new (deprecated alias for one release)


def _parser() -> argparse.ArgumentParser:
    from negdpo.core.console import CommandParser

    p = CommandParser(prog="negdpo sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="scan folder (MedCLIP-SAMv2 layout)")
    p.add_argument("--split", default="test", help="split of the folder whose positives are inpainted")
    p.add_argument("--generator", default="tiny", help="tiny | hub id | local diffusers folder")
    p.add_argument("--adapter", default=None, help="folder with pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True, help="output folder: one PNG per positive, preview.png, sample_args.json")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace an earlier sample run in --out (files negdpo did not write are kept)")
    p.add_argument("--sample_steps", type=int, default=20, help="denoising (sampling) steps per image")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--strength", type=float, default=1.0, help="1 = from pure noise; < 1 = from the noised --init")
    p.add_argument("--init", default="source", choices=INITS,
                   help="what a strength < 1 starts from: the positive (source) or its harmonic fill (harmonic)")
    p.add_argument("--scheduler", default=None, help=f"one of {sorted(SCHEDULERS)}")
    p.add_argument("--size", type=int, default=None, help="model resolution (default: the UNet's native)")
    p.add_argument("--batch_size", type=int, default=8, help="images per generator call")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its name")
    p.add_argument("--limit", type=int, default=None, help="at most this many positives")
    p.add_argument("--no_paste_back", action="store_true",
                   help="keep the generator's whole output (default: only the masked region replaces the positive)")
    p.add_argument("--seam_px", type=float, default=2.0,
                   help="width of the soft seam inside the mask when pasting back (default 2; <= 1: hard paste)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights' dtype (half precision needs a GPU)")
    from negdpo.core.window import add_reading_args

    add_reading_args(p)
    return underscore_flags(p)


PROG = "negdpo sample"
OWNED = ("*.png", "sample_args.json")  # what a sample run writes (and --overwrite_output_dir replaces)


def check_generator(model: str, adapter: str | None) -> None:
    """Fail fast, before any model loads: ``model`` resolves (preset, cached hub id or diffusers folder) and
    ``adapter`` (and any reference adapter it was trained on) holds LoRA weights; else a one-line user error."""
    from negdpo.core.models import ModelNotAvailableError, resolve_diffusion

    try:
        resolve_diffusion(model)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(f"--generator: {err}") from err
    if adapter:
        if not Path(adapter).exists():
            raise FileNotFoundError(f"--adapter {adapter}: no such file or folder")
        try:
            adapter_chain(adapter)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"--adapter: {err}") from err


def _main(argv: list[str]) -> int:
    from negdpo.core.config import derive_seed
    from negdpo.core.figures import write_grid
    from negdpo.core.imageio import save_png
    from negdpo.core.outdir import output_dir
    from negdpo.core.scans import ScanFolder
    from negdpo.core.window import reading_options

    args = parse_flags(_parser(), argv, RENAMED_FLAGS)
    if args.scheduler:
        scheduler_class(args.scheduler)
    folder = ScanFolder(args.data, on_error="skip", **reading_options(args))
    scans = [s for s in folder.load_split(args.split) if s.positive]
    if args.limit is not None:
        scans = scans[: args.limit]
    if not scans:
        raise ValueError(f"--data {args.data}: no positive scans (non-empty masks) in split '{args.split}'")
    check_generator(args.generator, args.adapter)  # before any model loads or --out is claimed
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite_output_dir")}
    with output_dir(args.out, "sample", args.overwrite_output_dir, owned=OWNED, settings=settings) as out:
        pipe = load_generator(args.generator, args.adapter, device=args.device, dtype=getattr(torch, args.dtype))
        seeds = [derive_seed(s.name, base=args.seed) for s in scans]
        outs = inpaint(pipe, [s.image for s in scans], [s.mask for s in scans], [s.prompt or "" for s in scans],
                       seeds, steps=args.sample_steps, guidance_scale=args.guidance_scale, strength=args.strength,
                       init=args.init, scheduler=args.scheduler, paste_back=not args.no_paste_back,
                       seam_px=args.seam_px, size=args.size, batch_size=args.batch_size)
        for scan, img in zip(scans, outs):
            save_png(out / f"{Path(scan.name).stem}.png", img)
        write_grid(out / "preview.png",
                   [[s.image, s.mask.astype(np.float32), o] for s, o in list(zip(scans, outs))[:8]],
                   column_labels=["positive", "lesion mask", "generated negative"])
        (out / "sample_args.json").write_text(
            json.dumps(vars(args) | {"seeds": dict(zip([s.name for s in scans], seeds))}, indent=1))
    print(f"wrote {len(outs)} negatives to {out} (preview: {out / 'preview.png'}); {folder.report()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: sample negatives for every positive of a split; writes OUT/<name>.png and OUT/preview.png.

    Inputs (scan folder, generator, adapter) are checked before any model loads; --out is claimed as every
    command claims its folder (``core.outdir``): a folder of another command or an earlier sample run with
    other settings is refused unless --overwrite_output_dir. User errors: one line, exit 2."""
    from negdpo.core.console import run_main

    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
