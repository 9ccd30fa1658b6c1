"""Benchmark ``negdpo build-pairs``: pairs/s end to end and the share of time in the UNet.

    python benchmarks/build_pairs.py                               # tiny, CPU, 64 px (the tested setting)
    python benchmarks/build_pairs.py --model real-random --device cuda --size 512 \\
        --steps 20 50 --batch-items 1 2 --k 4 --guidance 7.5           # SD-1.5-inpainting-sized, random init

Two measurements per (steps, batch_items) setting:
* ``build``: ``Builder.run_worker`` on a fresh phantom set (generate K candidates -> judge -> write
  shards), giving scans/s, pairs/s and generated img/s, with the UNet's forward time (CUDA-synchronised
  hooks) and the other stages (VAE + pipeline overhead, judges, writing) as shares of the wall time;
* ``inpaint``: ``negdpo.generator.sample.inpaint`` alone on batches of K x batch_items images (img/s).

Prints a table and writes ``benchmarks/results/build_pairs_<device>.json`` (or ``--out``).
``real-random`` (= ``sd15-inpaint-random``): SD-1.5-inpainting's exact architecture with random weights
(``negdpo.core.models.presets``), so it runs offline; the numbers are speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class UNetTimer:
    """Accumulates the UNet's forward time (synchronising CUDA around each call)."""

    def __init__(self, unet) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._t0 = 0.0
        self.handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | real-random | a diffusers folder / hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--size", type=int, default=64, help="phantom and model resolution")
    p.add_argument("--subjects", type=int, default=8, help="phantom subjects (x2 slices; ~75%% positive)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[20])
    p.add_argument("--batch-items", type=int, nargs="+", default=[1, 4], help="scans per generator call")
    p.add_argument("--guidance", type=float, default=1.0, help="> 1 enables CFG (doubles the UNet batch)")
    p.add_argument("--judges", default="clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from negdpo.core.phantoms import ensure_phantoms
    from negdpo.generator.sample import inpaint
    from negdpo.preference.pairs.build import BuildConfig, Builder

    work = Path(tempfile.mkdtemp(prefix="bench_pairs_"))
    model = "sd15-inpaint-random" if args.model == "real-random" else args.model  # the preset, random init
    data = ensure_phantoms(work / "phantoms", n=args.subjects, size=args.size, seed=0, slices=2)
    results = []
    builder = None
    for steps in args.steps:
        for bi in args.batch_items:
            cfg = BuildConfig(data=str(data), out=str(work / f"out_{steps}_{bi}"), generator=model, k=args.k,
                              steps=steps, guidance=args.guidance, batch_items=bi, chunk_size=max(bi, 8),
                              judges=args.judges, size=args.size, device=args.device, dtype=args.dtype,
                              progress=False)
            if builder is None:
                builder = Builder(cfg, device=args.device)
                timer = UNetTimer(builder.pipe.unet)
                # warm-up (allocations, kernels)
                s = np.zeros((args.size, args.size), np.float32)
                m = np.zeros_like(s, bool)
                m[: args.size // 4, : args.size // 4] = True
                inpaint(builder.pipe, [s] * 2, [m] * 2, ["x"] * 2, [0, 1], steps=2, size=args.size)
            else:
                builder.use_config(cfg)
            timer.reset()
            t0 = time.perf_counter()
            res = builder.run_worker(0, 1)
            wall = time.perf_counter() - t0
            unet_build = timer.seconds
            pairs = int(res.rows.get("generator", 0))
            positives = sum(1 for m in sorted(data.glob("*_masks/*.png")) if np.asarray(
                __import__("PIL.Image", fromlist=["Image"]).open(m)).any())
            gen = res.seconds.get("generate:inpaint", 0.0)
            # inpaint alone on one full batch
            n = args.k * bi
            img = np.random.default_rng(0).random((args.size, args.size)).astype(np.float32)
            timer.reset()
            t1 = time.perf_counter()
            inpaint(builder.pipe, [img] * n, [m] * n, ["A brain MRI with no tumour."] * n, list(range(n)),
                    steps=steps, guidance_scale=args.guidance, size=args.size, batch_size=n)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t_inp = time.perf_counter() - t1
            row = {
                "steps": steps, "batch_items": bi, "images_per_call": n, "scans": res.items,
                "positives": positives, "pairs": pairs, "wall_s": round(wall, 3),
                "scans_per_s": round(res.items / wall, 3), "pairs_per_s": round(pairs / wall, 3),
                "gen_img_per_s": round(positives * args.k / wall, 3),
                "share_unet": round(unet_build / wall, 3),
                "share_generate_not_unet": round((gen - unet_build) / wall, 3),
                "share_judge": round(res.seconds.get("judge+pairs", 0.0) / wall, 3),
                "share_write_read": round((res.seconds.get("write", 0.0) + res.seconds.get("read", 0.0)) / wall, 3),
                "inpaint_img_per_s": round(n / t_inp, 3), "inpaint_unet_share": round(timer.seconds / t_inp, 3),
            }
            results.append(row)
    cols = ["steps", "batch_items", "scans", "pairs", "wall_s", "pairs_per_s", "gen_img_per_s", "share_unet",
            "share_generate_not_unet", "share_judge", "share_write_read", "inpaint_img_per_s", "inpaint_unet_share"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    env = {"device": args.device, "model": args.model, "size": args.size, "k": args.k, "guidance": args.guidance,
           "dtype": args.dtype, "judges": args.judges, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out = Path(args.out or Path(__file__).parent / "results" / f"build_pairs_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "results": results}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
