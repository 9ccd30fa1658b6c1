"""Launch honesty: the process count a launcher was asked for against the one a run got.

Two ways a launch silently differs from what was asked (both seen on CPU machines):

* ``accelerate launch --num_processes N`` with a config whose ``distributed_type`` is ``NO`` (e.g.
  ``accelerate_configs/cpu.yaml``) runs Accelerate's *simple* launcher: one process, whatever N.
  The run goes on and :func:`launch_warning` says so once.
* a multi-process launcher (torchrun; ``accelerate_configs/multi_gpu.yaml``) on a machine where the
  processes cannot form a group (no GPUs): every process would run alone on one folder.
  :func:`check_launch` stops the run: rank 0 prints one line (``LaunchError``, exit 2 through
  ``core.console.run_main``), the other ranks exit 2 silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CPU_DDP_HINT = "for data parallelism on CPU: ACCELERATE_USE_CPU=true torchrun --nproc_per_node N <script> ..."
_NUM_PROCESSES = re.compile(r"--num[_-]processes(?:=(\d+))?$")


class LaunchError(ValueError):
    """The launch cannot give the run what it was asked for (a user error: one line, exit 2)."""


def env_rank(env: Mapping[str, str]) -> int:
    """The launcher's global rank of this process (``RANK``, else ``LOCAL_RANK``; 0 when unset)."""
    for key in ("RANK", "LOCAL_RANK"):
        value = env.get(key, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def requested_processes(argv: Sequence[str] | None) -> int | None:
    """N of ``--num_processes N`` / ``--num-processes=N`` on an ``accelerate launch`` command line."""
    if not argv or not any("accelerate" in a for a in argv[:3]):
        return None
    for i, arg in enumerate(argv):
        match = _NUM_PROCESSES.match(arg)
        if match:
            value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def parent_argv() -> list[str] | None:
    """The parent process's command line (Linux ``/proc``); None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def launch_warning(env: Mapping[str, str], world_size: int, argv: Sequence[str] | None = None) -> str | None:
    """A one-paragraph warning when the launcher was asked for more processes than the run has, else None.

    ``argv`` is the launcher's command line (:func:`parent_argv`); without a count there, Accelerate's
    simple launcher is recognised by the variables it sets for N > 1 (``MASTER_ADDR`` with
    ``ACCELERATE_USE_CPU`` and no ``WORLD_SIZE``).
    """
    asked = requested_processes(argv)
    if asked is None and "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        asked_text = "several processes"
    elif asked is not None and asked > world_size:
        asked_text = f"{asked} processes"
    else:
        return None
    return (f"accelerate launch was asked for {asked_text} but this run has {world_size}: with "
            "distributed_type NO or use_cpu in the config (e.g. accelerate_configs/cpu.yaml) Accelerate starts a "
            f"single process. The run goes on with {world_size}; {CPU_DDP_HINT}; on GPUs use "
            "--config_file accelerate_configs/multi_gpu.yaml.")


def check_launch(accelerator: Any, env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> None:
    """Stop N processes that could not form a group (each would run alone on one folder); warn when the
    launcher was asked for more processes than it started. Call right after creating the Accelerator."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        if env_rank(env) != 0:
            raise SystemExit(2)  # rank 0 says why, once
        raise LaunchError(
            f"the launcher started {world} processes but each runs alone (no process group: e.g. a multi-GPU "
            "accelerate config on a machine without GPUs); they would all write one folder. Launch one process "
            f"(accelerate_configs/cpu.yaml), or {CPU_DDP_HINT}")
    message = launch_warning(env, accelerator.num_processes, parent_argv() if argv is None else argv)
    if message and accelerator.is_main_process:
        logger.warning(message)
