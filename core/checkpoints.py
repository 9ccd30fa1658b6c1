"""Accelerate ``save_state`` folders named ``checkpoint-<step>``: atomic writes, listing, resume target, pruning.

A checkpoint is written into a hidden sibling (``.checkpoint-<step>.partial``), its files are fsynced, a
completeness marker (:data:`MARKER`) is written last, and only then is the folder renamed into place. A run
killed at any moment therefore leaves either a complete ``checkpoint-<step>`` or none; ``latest`` only ever
picks complete ones (and says which incomplete ones it skipped), and pruning runs after the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
MARKER = "negdpo_checkpoint.json"
PARTIAL_PREFIX = ".checkpoint-"


def step_of(path: str | Path) -> int:
    """The step number of a ``checkpoint-<step>`` folder."""
    return int(Path(path).name.rsplit("-", 1)[-1])


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(out: str | Path, complete_only: bool = False) -> list[Path]:
    """``out/checkpoint-<step>`` folders, oldest first (other names are ignored)."""
    cps = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    if complete_only:
        cps = [p for p in cps if is_complete(p)]
    return sorted(cps, key=step_of)


def latest_checkpoint(out: str | Path) -> Path | None:
    """Newest complete checkpoint; incomplete ones (a kill during a save) are skipped with a warning."""
    cps = list_checkpoints(out)
    skipped = [p.name for p in cps if not is_complete(p)]
    if skipped:
        logger.warning("skipping incomplete checkpoint(s) %s in %s (no %s)", skipped, out, MARKER)
    done = [p for p in cps if is_complete(p)]
    return done[-1] if done else None


def prune_checkpoints(out: str | Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``None`` keeps all); incomplete ones go too."""
    if keep is None:
        return
    cps = list_checkpoints(out)
    complete = [p for p in cps if is_complete(p)]
    doomed = [p for p in cps if not is_complete(p)] + complete[: max(0, len(complete) - keep)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    for partial in Path(out).glob(f"{PARTIAL_PREFIX}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_dir(out: str | Path, step: int) -> Path:
    return Path(out) / f"{PARTIAL_PREFIX}{step}.partial"


def finalize_checkpoint(out: str | Path, step: int, info: dict | None = None) -> Path:
    """Mark ``partial_dir(out, step)`` complete and rename it to ``checkpoint-<step>`` (replacing an old one)."""
    out = Path(out)
    tmp, final = partial_dir(out, step), out / f"checkpoint-{step}"
    _fsync_tree(tmp)
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step, **(info or {})}))
    with open(marker, "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        trash = out / f"{PARTIAL_PREFIX}{step}.old.partial"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(out)
    return final


def write_checkpoint(out: str | Path, step: int, save: Callable[[Path], None], info: dict | None = None) -> Path:
    """Single-process helper: ``save(tmp_dir)`` then :func:`finalize_checkpoint`."""
    tmp = partial_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    return finalize_checkpoint(out, step, info)
