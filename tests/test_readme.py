"""README truth: the numbers the quick start quotes are what command 1 prints today."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACC = re.compile(r"held-out implicit accuracy \(z > 0; ties count as wrong\): ([0-9.]+) -> ([0-9.]+)")


def quoted_demo_accuracy() -> tuple[str, str]:
    (match,) = ACC.findall((ROOT / "README.md").read_text())
    return match


def test_readme_quotes_the_demo_accuracy_once():
    before, after = quoted_demo_accuracy()
    assert before == "0.000" and 0.0 < float(after) <= 1.0


@pytest.mark.slow
def test_demo_prints_what_the_readme_quotes(tmp_path):
    """Command 1 of the quick start, run in an empty folder (about 1-2 minutes on a 2-core CPU)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "gen_train.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ACC.findall(out.stdout) == [quoted_demo_accuracy()]
