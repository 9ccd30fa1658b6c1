"""Shared by the fault-probe tests (issue 25): log capture, one-line error checks, a live pid, fast settings."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP_FAST = dict(loss="dpo+clip", train_batch_size=4, eval_batch_size=8, report_to="none", tsne=False,
                 progress_bar=False, logging_steps=1, lr_scheduler="constant")


@contextlib.contextmanager
def fresh_console():
    """``setup_logging`` binds its handler to the stderr of the first test that called it; these tests read
    stderr, so each gets a handler of its own (restored afterwards)."""
    log = logging.getLogger("negdpo")
    saved, propagate, level = log.handlers[:], log.propagate, log.level
    log.handlers.clear()
    yield
    log.handlers[:] = saved
    log.propagate, log.level = propagate, level


@contextlib.contextmanager
def records(name: str):
    """Log records of logger ``name`` (a handler on the logger itself: ``negdpo`` does not propagate)."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    log = logging.getLogger(name)
    handler, level = Keep(level=logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def clip_args(data: Path, out: Path, **extra) -> list[str]:
    settings = {**CLIP_FAST, "dataset_name": str(data), "output_dir": str(out), **extra}
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


BUILD = ["--splits", "test", "--judges", "contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2", "--k", "2",
         "--sample_steps", "2", "--batch_items", "1", "--chunk_size", "1", "--no_progress", "--no_report"]
