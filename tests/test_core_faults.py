"""One fault hook (core/faults.py) for the trainers (a step number) and the pair builder (a pass count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from negdpo.core.faults import parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_spec_entries_steps_and_bare_names():
    assert parse_spec("step_end:2, shard_write:1,merge") == {("step_end", 2), ("shard_write", 1), ("merge", 1)}
    assert parse_spec("") == set()
    with pytest.raises(ValueError, match="NEGDPO_FAULT: 'card:x' is not <point>:<integer>"):
        parse_spec("card:x")


def _run(code: str, spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NEGDPO_FAULT"} | ({"NEGDPO_FAULT": spec} if spec else {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


PASSES = ("from negdpo.core.faults import fault_point\n"
          "for i in range(1, 5):\n    print('pass', i, flush=True)\n    fault_point('shard_write')\n"
          "    fault_point('step_end', 10 * i)\n")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL")
@pytest.mark.parametrize(("spec", "killed_in"), [
    ("shard_write:3", 3),  # no step given: the third pass through the point
    ("shard_write", 1),  # bare name: the first pass
    ("step_end:20", 2),  # a step given: that step, whatever the pass count
    ("step_end:3, shard_write:2", 2),  # a list: the first entry reached
    ("step_end:3", None),  # never reached (step 3 is not a step of this loop)
    (None, None),
])
def test_kills_at_the_named_pass_or_step(spec, killed_in):
    res = _run(PASSES, spec)
    printed = [int(line.split()[1]) for line in res.stdout.split("\n") if line.startswith("pass")]
    if killed_in is None:
        assert res.returncode == 0 and printed == [1, 2, 3, 4], res.stderr[-2000:]
    else:
        assert res.returncode == -signal.SIGKILL and printed == list(range(1, killed_in + 1)), res.stderr[-2000:]
