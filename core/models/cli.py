"""``negdpo models [--clip NAME] [--sam NAME] [--diffusion NAME]``: build presets / check weights.

``negdpo models --list [--json]`` lists every offline preset with its parameter count per component
(counted on the meta device: nothing is built or downloaded).
"""

from __future__ import annotations

import argparse
import json

from ..config import parse_flags, underscore_flags
from ..console import CommandParser, run_main
from . import ModelNotAvailableError, resolve_clip, resolve_diffusion, resolve_sam

PROG = "negdpo models"


def list_presets() -> list[dict]:
    """``[{"name", "role", "summary", "params": {component: count}}]`` for every preset."""
    from .presets import PRESETS, param_counts

    return [{"name": p.name, "role": p.role, "summary": p.summary, "params": param_counts(p)} for p in PRESETS]


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the offline presets with parameter counts")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    p.add_argument("--clip", default="tiny", help="CLIP to check: a preset (see --list) | hf-hub:<id> | local-dir:<folder>")
    p.add_argument("--sam", default="tiny", help="SAM to check: a preset (see --list) | vit_b | vit_l | vit_h")
    p.add_argument("--sam_checkpoint", default=None,
                   help="SAM weights file (.pth) to check instead of the preset's or the cached one")
    p.add_argument("--diffusion", default="tiny",
                   help="inpainting generator to check: a preset (see --list) | hub id | local diffusers folder")
    return underscore_flags(p)


def _main(argv: list[str]) -> int:
    a = parse_flags(build_parser(), argv)
    if a.list:
        rows = list_presets()
        if a.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'preset':<20} {'role':<10} {'total':>10}  components")
        for r in rows:
            parts = ", ".join(f"{k} {_millions(v)}" for k, v in r["params"].items())
            print(f"{r['name']:<20} {r['role']:<10} {_millions(sum(r['params'].values())):>10}  {parts}")
        return 0
    missing = []
    for label, fn in (("clip", lambda: resolve_clip(a.clip)), ("sam", lambda: resolve_sam(a.sam, a.sam_checkpoint)),
                      ("diffusion", lambda: resolve_diffusion(a.diffusion))):
        try:
            print(f"{label:<10} {fn()}")
        except ModelNotAvailableError as err:
            missing.append(f"{label}: {err}")
    if missing:  # one line for all of them (exit 2)
        raise ModelNotAvailableError(f"not available: {' | '.join(missing)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every model available: 0; any missing: one ``error: not available: ...`` line and exit 2."""
    return run_main(PROG, _main, argv)
