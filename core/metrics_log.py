"""``metrics.jsonl``: one JSON record per logged step, reduced over processes, written by the main process.

Appends are single ``os.write`` calls and a short write is undone, so a full disk leaves no torn line; a torn
last line left by a kill is dropped with a warning when the log is read again (:func:`read_metrics`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .training import Run

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def reduce_metrics(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over processes (every process must pass the same keys)."""
    if accelerator.num_processes == 1 or not metrics:
        return {k: float(v) for k, v in metrics.items()}
    import torch

    keys = sorted(metrics)
    local = torch.tensor([float(metrics[k]) for k in keys], device=accelerator.device, dtype=torch.float64)
    mean = accelerator.reduce(local, reduction="mean")
    return dict(zip(keys, mean.tolist()))


class MetricsLog:
    """``metrics.jsonl`` + trackers: reduced over processes, written by the main process only.

    Resuming at step ``s`` drops lines with a step > ``s`` (written after the checkpoint), so the file never
    holds a step twice. A torn last line (a kill or a full disk during an append) is dropped with a warning;
    each record is appended with one ``os.write`` and a short write is undone, so no later line is torn.
    """

    def __init__(self, run: Run, start_step: int = 0, name: str = METRICS_FILE) -> None:
        self.run, self.path = run, run.out / name
        if run.is_main and self.path.exists():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            tmp = self.path.with_name(f".{name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float], to_trackers: bool = True) -> dict[str, float]:
        reduced = reduce_metrics(self.run.accelerator, metrics)
        if to_trackers:
            self.run.accelerator.log(reduced, step=step)
        if self.run.is_main:
            append_line(self.path, json.dumps({"step": step, **reduced}))
        return reduced


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line is dropped with a warning, any other bad line
    is an error naming the file and the line."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) - 1:
                logger.warning("%s: dropped a torn last line (%d characters; an interrupted write)", path, len(line))
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({err}); delete that line, then rerun "
                             "with --resume_from_checkpoint latest") from None
        records.append(record)
    return records


def append_line(path: Path, line: str) -> None:
    """Append ``line + newline`` with a single ``write``; a short or failed write is truncated away."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            _truncate(fd, size)
            raise
        if written != len(data):
            _truncate(fd, size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(fd)


def _truncate(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
