"""Shared helpers: the preset cache, atomic preset builds, hub availability checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import UserError

PRESET_VERSION = "1"  # default preset version; bump a preset's own version when its architecture/init changes


class ModelNotAvailableError(RuntimeError, UserError):
    """Requested weights are not available locally (and the hub cannot be reached)."""


def cache_home() -> Path:
    return Path(os.environ.get("NEGDPO_HOME", Path.home() / ".cache" / "negdpo"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Seed torch's CPU generator for the block and give the caller's random state back afterwards.

    Preset weights are a function of ``seed`` alone, and building one (on first use, inside a training
    run) leaves the run's own random stream -- LoRA init, dropout, noise -- exactly where it was.
    Only the CPU generator is seeded (``torch.manual_seed`` would also queue a CUDA reseed that
    ``fork_rng`` cannot undo); models are built on the CPU or the meta device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers / diffusers progress bars in the block ("Writing model shards" on stderr while a preset is
    built on first use: a command's one-line error would otherwise come with them); their state is restored."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (t_logging, d_logging)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in was:
            if on:
                m.enable_progress_bar()


def build_once(name: str, builder: Callable[[Path, Path], None], version: str = PRESET_VERSION) -> Path:
    """Build a preset into ``cache_home()/presets/<name>-v<version>`` once; safe under concurrency.

    ``builder(tmp, final)`` writes into ``tmp``, which is then renamed to ``final`` atomically. The
    builder runs inside :func:`seeded`: the caller's random state is the same whether the preset was
    already cached or built now (a first run prints what a second run prints).
    """
    target = cache_home() / "presets" / f"{name}-v{version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with seeded(0), quiet_progress():
            builder(tmp, target)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first (or a stale partial dir is there)
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def hub_snapshot(repo_id: str, what: str, hint: str) -> str:
    """Local snapshot folder of a hub repo; offline and uncached -> ModelNotAvailableError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=hub_offline())
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"{what} '{repo_id}' is not available: looked in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'})"
            f"{' with HF_HUB_OFFLINE=1' if hub_offline() else ''}. {hint}"
        ) from err
