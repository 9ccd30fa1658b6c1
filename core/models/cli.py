"""``negdpo models [--clip NAME] [--sam NAME] [--diffusion NAME]``: build presets / check weights."""

from __future__ import annotations

import argparse
import sys

from . import ModelNotAvailableError, resolve_clip, resolve_diffusion, resolve_sam


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="negdpo models", description=__doc__)
    p.add_argument("--clip", default="tiny")
    p.add_argument("--sam", default="tiny")
    p.add_argument("--sam-checkpoint", default=None)
    p.add_argument("--diffusion", default="tiny")
    a = p.parse_args(argv)
    ok = True
    for label, fn in (("clip", lambda: resolve_clip(a.clip)), ("sam", lambda: resolve_sam(a.sam, a.sam_checkpoint)),
                      ("diffusion", lambda: resolve_diffusion(a.diffusion))):
        try:
            print(f"{label:<10} {fn()}")
        except ModelNotAvailableError as err:
            ok = False
            print(f"{label:<10} NOT AVAILABLE: {err}", file=sys.stderr)
    return 0 if ok else 1
