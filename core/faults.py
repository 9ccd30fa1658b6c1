"""Test hook for the crash-safety tests: kill this process (SIGKILL, as ``kill -9``) at a named point.

``NEGDPO_FAULT="<point>[:<k>][,<point>:<k>...]"`` kills the process when ``fault_point("<point>", ...)``
reaches number ``k``: the ``step`` the caller passes (trainers: the global step, e.g. ``step_end:2``) or,
when the caller passes none, the 1-based count of passes through that point in this process (the pair
builder: ``shard_write:2`` is the second shard write). A bare ``<point>`` means ``<point>:1``. Unset
(always, outside tests) a call costs one dictionary lookup.

Points: trainers ``step_end``, ``after_log``, ``checkpoint_save``, ``checkpoint_prune``, ``final``; on-policy
rounds ``onpolicy_sampled_r<round>``, ``onpolicy_pairs``; the pair builder ``shard_write`` (a temporary
parquet file holds row data but no footer), ``shard_done``, ``merge`` (a kind's dataset folder is being
swapped), ``card`` (before the dataset card is written).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "NEGDPO_FAULT"
_passes: Counter = Counter()


def parse_spec(spec: str) -> set[tuple[str, int]]:
    """``"a:2, b"`` -> {("a", 2), ("b", 1)}; a number that is not an integer is an error naming the entry."""
    points: set[tuple[str, int]] = set()
    for entry in (s.strip() for s in spec.split(",")):
        if not entry:
            continue
        name, _, k = entry.partition(":")
        try:
            points.add((name, int(k) if k else 1))
        except ValueError:
            raise ValueError(f"{ENV}: '{entry}' is not <point>:<integer>") from None
    return points


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if ``NEGDPO_FAULT`` names (``name``, ``step`` or this point's pass count)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if step is None:
        _passes[name] += 1
        step = _passes[name]
    if (name, step) in parse_spec(spec):
        os.kill(os.getpid(), signal.SIGKILL)
