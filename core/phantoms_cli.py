"""``negdpo phantoms --out DIR [--n N] [--size S] [--seed K] [--slices M] [--pretrain_n P] [--lesion_area LO HI]
[--overwrite_output_dir]``.

The command owns what it writes in DIR (see ``negdpo.core.phantoms``). The same settings again
rewrite the set in place; a set with other settings (or other files) there is refused unless
``--overwrite_output_dir``, which removes the earlier set first and keeps files that are not its
own. Files of the set's names that negdpo did not write are never deleted. A lock file keeps two
runs out of one folder.
"""

from __future__ import annotations

import argparse
import time

from .config import parse_flags, underscore_flags
from .console import CommandParser, run_main
from .phantoms import MODALITIES, PhantomConfig, generate

PROG = "negdpo phantoms"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (scan folder layout + twins)")
    p.add_argument("--n", type=int, default=40, help="number of subjects, split over modalities (default 40)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--slices", type=int, default=2, help="images per subject (default 2)")
    p.add_argument("--healthy_fraction", type=float, default=0.25,
                   help="share of healthy-only subjects (default 0.25)")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES,
                   help="modalities to draw, subjects split evenly over them (default: all)")
    p.add_argument("--pretrain_n", type=int, default=0,
                   help="extra subjects in a disjoint 'pretrain' split (default 0: none)")
    p.add_argument("--lesion_area", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="lesion area drawn log-uniformly from LO..HI of the image (default: radius 4-13%% of the side)")
    p.add_argument("--no_preview", action="store_true", help="skip preview.png")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace an earlier phantom set (other files in --out are kept)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return underscore_flags(p)


def _main(argv: list[str]) -> int:
    a = parse_flags(build_parser(), argv)
    t0 = time.perf_counter()
    cfg = PhantomConfig(out=a.out, n=a.n, size=a.size, seed=a.seed, slices=a.slices,
                        healthy_fraction=a.healthy_fraction, modalities=tuple(a.modalities),
                        preview=not a.no_preview, pretrain_n=a.pretrain_n,
                        lesion_area=tuple(a.lesion_area) if a.lesion_area else None)
    out = generate(cfg, overwrite=a.overwrite_output_dir)
    n_img = (a.n + a.pretrain_n) * a.slices
    dt = time.perf_counter() - t0
    preview = f"; preview: {out / 'preview.png'}" if not a.no_preview else ""
    print(f"wrote {n_img} images ({a.size}px) to {out} in {dt:.1f}s ({n_img / dt:.0f} img/s){preview}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad settings, a refused or unwritable --out: one line and exit 2 (``--debug``: the traceback)."""
    return run_main(PROG, _main, argv)
