"""Accelerate ``save_state`` folders named ``checkpoint-<step>``: listing, resume target, pruning."""

from __future__ import annotations

import shutil
from pathlib import Path


def list_checkpoints(out: str | Path) -> list[Path]:
    """``out/checkpoint-<step>`` folders, oldest first (other names are ignored)."""
    cps = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(cps, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def latest_checkpoint(out: str | Path) -> Path | None:
    cps = list_checkpoints(out)
    return cps[-1] if cps else None


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    cps = list_checkpoints(out)
    for old in cps[: max(0, len(cps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
