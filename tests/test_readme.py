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


@pytest.mark.integration
def test_demo_prints_what_the_readme_quotes(tmp_path):
    """Command 1 of the quick start as a new user runs it: an empty folder and an empty ``NEGDPO_HOME``
    (so the tiny presets are built during the run, as on a fresh machine). About 40 s on an idle
    2-core CPU; the presets built on first use must not shift the run's random stream."""
    work, home = tmp_path / "work", tmp_path / "negdpo-home"
    work.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", NEGDPO_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "gen_train.py")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (home / "presets").is_dir()  # the run built its presets itself
    assert ACC.findall(out.stdout) == [quoted_demo_accuracy()]
