"""Throughput of the zero-shot chain: M2IB batched vs one image at a time, SAM encoder, whole chain.

    python benchmarks/evaluate.py                       # tiny CLIP + tiny SAM on CPU (tested here)
    python benchmarks/evaluate.py --device cuda --clip biomedclip-random --sam vit_h --images 64 --batch 32

``biomedclip-random``: BiomedCLIP's vision tower (timm vit_base_patch16_224, 12 blocks, width 768,
embed 512) randomly initialised (text tower = the tiny BERT; only its features are used).
``--sam vit_b|vit_l|vit_h``: random-init SAM of that size (no checkpoint needed). GPU paths are untested
on CPU-only machines. Prints a table; writes ``benchmarks/results/evaluate_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_clip(name: str, device: str):
    from negdpo.core.models import load_clip, resolve_clip

    if name == "tiny":
        return load_clip("tiny", device)
    if name != "biomedclip-random":
        return load_clip(name, device)
    import open_clip
    import torch

    bert = resolve_clip("tiny").removeprefix("local-dir:")
    cfg = json.loads((Path(bert) / "open_clip_config.json").read_text())["model_cfg"]
    cfg["embed_dim"] = 512
    cfg["vision_cfg"]["timm_model_name"] = "vit_base_patch16_224"
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**cfg).to(device).eval()
    _, preprocess, tokenizer = load_clip("tiny", "cpu")
    return model, preprocess, tokenizer


def build_sam(name: str, device: str):
    from negdpo.core.models import load_sam

    if name == "tiny":
        return load_sam("tiny", device=device)
    from segment_anything import sam_model_registry

    return sam_model_registry[name]().to(device).eval()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip", default="tiny", help="tiny | biomedclip-random | any load_clip name")
    p.add_argument("--sam", default="tiny", help="tiny | vit_b | vit_l | vit_h (random init)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="scan size (px)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from negdpo.core.imageio import to_rgb_uint8
    from negdpo.segmentation.postprocess import coarse_mask
    from negdpo.segmentation.saliency import SaliencyContext, get
    from negdpo.segmentation.sam_prompt import SamSegmenter

    rng = np.random.default_rng(0)
    scans = []
    for i in range(a.images):
        mask = np.zeros((a.size, a.size), bool)
        mask[a.size // 4: a.size // 2, a.size // 3: 2 * a.size // 3] = True
        img = np.clip(rng.random((a.size, a.size)) * 0.5 + 0.4 * mask, 0, 1).astype(np.float32)
        scans.append(SimpleNamespace(name=f"b{i}.png", image=img, mask=mask))
    prompts = ["a scan showing a tumour"] * a.images
    clip = build_clip(a.clip, a.device)
    ctx = SaliencyContext(clip=clip, device=a.device)
    m2ib = get("m2ib")
    m2ib(ctx, scans[:2], prompts[:2])  # warm-up

    def timed(fn) -> float:
        sync(a.device)
        t = time.perf_counter()
        fn()
        sync(a.device)
        return time.perf_counter() - t

    def batched():
        for s in range(0, a.images, a.batch):
            m2ib(ctx, scans[s:s + a.batch], prompts[s:s + a.batch])

    results = {}
    results["m2ib_one_at_a_time"] = a.images / timed(lambda: [m2ib(ctx, [s], [q]) for s, q in zip(scans, prompts)])
    results[f"m2ib_batched_{a.batch}"] = a.images / timed(batched)
    seg = SamSegmenter(build_sam(a.sam, a.device))
    rgb = [to_rgb_uint8(s.image) for s in scans]
    seg.set_image(rgb[0])
    results["sam_encoder"] = a.images / timed(lambda: [seg.set_image(im) for im in rgb])

    def chain():
        from negdpo.segmentation import metrics as M

        for s in range(0, a.images, a.batch):
            batch = scans[s:s + a.batch]
            for scan, sal in zip(batch, m2ib(ctx, batch, prompts[s:s + a.batch])):
                seg.set_image(to_rgb_uint8(scan.image))
                pred, _ = seg.segment(coarse_mask(sal), 0)
                M.all_metrics(pred, scan.mask)

    results["whole_chain"] = a.images / timed(chain)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{'stage':<22} {'img/s':>10}   ({a.clip}, SAM {a.sam}, {a.images} images {a.size}px, {device_name})")
    for k, v in results.items():
        print(f"{k:<22} {v:>10.2f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if a.device == "cpu" else "gpu"
    (out / f"evaluate_{tag}.json").write_text(json.dumps({
        "device": device_name, "clip": a.clip, "sam": a.sam, "images": a.images, "batch": a.batch, "size": a.size,
        "images_per_s": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
