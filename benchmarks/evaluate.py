"""Throughput of the zero-shot chain: M2IB batched vs one image at a time, SAM encoder, whole chain.

    python benchmarks/evaluate.py                       # tiny CLIP + tiny SAM on CPU (tested here)
    python benchmarks/evaluate.py --device cuda --clip biomedclip-random --sam sam-vit-h-random --images 64 --batch 32

``--clip`` / ``--sam`` take any model name of ``negdpo.core.models`` (``biomedclip-random``,
``sam-vit-b-random``, ``sam-vit-h-random`` are the real architectures with random weights).
Prints a table; writes ``benchmarks/results/evaluate_<device>.json``.
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


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def phantom_like(n: int, size: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    scans = []
    for i in range(n):
        mask = np.zeros((size, size), bool)
        mask[size // 4: size // 2, size // 3: 2 * size // 3] = True
        img = np.clip(rng.random((size, size)) * 0.5 + 0.4 * mask, 0, 1).astype(np.float32)
        scans.append(SimpleNamespace(name=f"b{i}.png", image=img, mask=mask))
    return scans


def measure(clip: str, sam: str, device: str, images: int, batch: int, size: int,
            parts: tuple[str, ...] = ("m2ib", "sam", "chain"), options: dict | None = None) -> dict[str, float]:
    """images/s of M2IB one at a time vs batched, the SAM encoder, and the whole chain.

    ``options``: saliency options (M2IB: ``steps``, ``samples``, ...; default M2IBConfig's)."""
    from negdpo.core.imageio import to_rgb_uint8
    from negdpo.core.models import load_clip, load_sam
    from negdpo.segmentation.postprocess import coarse_mask
    from negdpo.segmentation.saliency import SaliencyContext, get
    from negdpo.segmentation.sam_prompt import SamSegmenter

    scans = phantom_like(images, size)
    prompts = ["a scan showing a tumour"] * images
    ctx = SaliencyContext(clip=load_clip(clip, device), device=device, options=dict(options or {}))
    m2ib = get("m2ib")
    m2ib(ctx, scans[:1], prompts[:1])  # warm-up

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    def batched():
        for s in range(0, images, batch):
            m2ib(ctx, scans[s:s + batch], prompts[s:s + batch])

    results = {}
    if "m2ib" in parts:
        results["m2ib_one_at_a_time"] = images / timed(lambda: [m2ib(ctx, [s], [q]) for s, q in zip(scans, prompts)])
        results[f"m2ib_batched_{batch}"] = images / timed(batched)
    if "sam" in parts or "chain" in parts:
        seg = SamSegmenter(load_sam(sam, device=device))
        rgb = [to_rgb_uint8(s.image) for s in scans]
        seg.set_image(rgb[0])
        if "sam" in parts:
            results["sam_encoder"] = images / timed(lambda: [seg.set_image(im) for im in rgb])
    if "chain" in parts:
        def chain():
            from negdpo.segmentation import metrics as M

            for s in range(0, images, batch):
                group = scans[s:s + batch]
                for scan, sal in zip(group, m2ib(ctx, group, prompts[s:s + batch])):
                    seg.set_image(to_rgb_uint8(scan.image))
                    pred, _ = seg.segment(coarse_mask(sal), 0)
                    M.all_metrics(pred, scan.mask)

        results["whole_chain"] = images / timed(chain)
    return {k: round(v, 4) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clip", default="tiny", help="tiny | biomedclip-random | any load_clip name")
    p.add_argument("--sam", default="tiny", help="tiny | sam-vit-b-random | sam-vit-h-random | vit_b|vit_l|vit_h")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="scan size (px)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    import torch

    results = measure(a.clip, a.sam, a.device, a.images, a.batch, a.size)
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
