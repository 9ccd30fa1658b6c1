"""``negdpo phantoms --out DIR [--n N] [--size S] [--seed K] [--slices M]``."""

from __future__ import annotations

import argparse
import time

from .phantoms import MODALITIES, PhantomConfig, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="negdpo phantoms", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (scan folder layout + twins)")
    p.add_argument("--n", type=int, default=40, help="number of subjects, split over modalities")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slices", type=int, default=2, help="images per subject")
    p.add_argument("--healthy-fraction", type=float, default=0.25, help="share of healthy-only subjects")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES)
    p.add_argument("--no-preview", action="store_true", help="skip preview.png")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(PhantomConfig(out=a.out, n=a.n, size=a.size, seed=a.seed, slices=a.slices,
                                 healthy_fraction=a.healthy_fraction, modalities=tuple(a.modalities),
                                 preview=not a.no_preview))
    n_img = a.n * a.slices
    dt = time.perf_counter() - t0
    print(f"wrote {n_img} images ({a.size}px) to {out} in {dt:.1f}s ({n_img / dt:.0f} img/s); preview: {out / 'preview.png'}")
    return 0
