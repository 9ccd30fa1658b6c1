"""Test hook for crash-safety tests: kill this process at a named point of a pair build.

``NEGDPO_FAULT="<point>:<n>"`` makes the n-th (1-based) pass through ``fault_point("<point>")`` send
SIGKILL to the own process, exactly as ``kill -9`` would. Points: ``shard_write`` (inside a shard write:
the temporary parquet file holds row data but no footer), ``shard_done`` (after a shard is renamed into
place), ``merge`` (while a kind's dataset folder is being swapped), ``card`` (before the dataset card is
written). Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "NEGDPO_FAULT"
_hits: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
