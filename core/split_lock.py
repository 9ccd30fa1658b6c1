"""A locked split: while :func:`locked_splits` is active, opening any file of a scan folder's locked splits
(``<split>_images/``, ``<split>_masks/``, ``<split>_twins/``) raises :class:`LockedSplitError`, and every file
opened under any split folder is recorded (split -> count) in the active :class:`SplitReads`.

It works below every reader (PIL, numpy, ``open``, pydicom, nibabel through Python's ``open``): a Python audit
hook (PEP 578) on the ``open`` event, installed once per process and inert when no lock is active. Files opened
by C code that bypasses Python's ``open`` (e.g. OpenCV's ``imread``) are not seen; the scan readers of
:mod:`negdpo.core.imageio` use PIL / pydicom / nibabel. The study selects everything with the test split locked
(docs/method.md#statistics, "A locked test split").
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_SPLIT_DIR = re.compile(r"^(?P<split>[A-Za-z0-9]+)_(images|masks|twins)$")


class LockedSplitError(BaseException):
    """A file of a locked split was opened. A ``BaseException`` (like ``KeyboardInterrupt``), so that no reader's
    ``except OSError`` / ``except Exception`` (skip-unreadable-file logic) can swallow it: the run stops."""


@dataclass
class SplitReads:
    """What was opened while a lock was active: {split: files opened}, and the locked splits."""

    locked: frozenset[str]
    reads: Counter = field(default_factory=Counter)


_state = threading.local()
_installed = False
_lock = threading.Lock()


def split_of(path: object) -> str | None:
    """The split whose folder holds ``path`` (``.../test_images/x.png`` -> ``test``), else None."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return None
    parent = os.path.basename(os.path.dirname(os.fspath(path)))
    m = _SPLIT_DIR.match(parent)
    return m.group("split") if m else None


def _audit(event: str, args: tuple) -> None:
    if event != "open":
        return
    stack = getattr(_state, "stack", None)
    if not stack:
        return
    split = split_of(args[0]) if args else None
    if split is None:
        return
    active = stack[-1]
    if split in active.locked:
        raise LockedSplitError(f"{os.fspath(args[0])}: the '{split}' split is locked here (only the final "
                               "evaluation may read it)")
    active.reads[split] += 1


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_audit)  # cannot be removed; does nothing while no lock is active
            _installed = True


@contextmanager
def locked_splits(splits: Iterable[str] = ("test",)) -> Iterator[SplitReads]:
    """Within the block (this thread), opening a file of ``splits`` (or of a split an enclosing block locked)
    raises; reads of the other splits are counted in the yielded :class:`SplitReads`."""
    _install()
    record = SplitReads(locked=frozenset(splits) | active_lock())  # a nested block never unlocks
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(record)
    try:
        yield record
    finally:
        stack.pop()


def active_lock() -> frozenset[str]:
    """The splits locked in this thread now (empty when no lock is active)."""
    stack = getattr(_state, "stack", None)
    return stack[-1].locked if stack else frozenset()
