"""The committed study results are reproducible artefacts: made by a commit that is in this repository's
history, with no absolute path of the machine that ran them (issue 22)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from json_common import json_strings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "results").glob("*/results.json"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.parent.name)
def test_no_absolute_paths_in_committed_results(path: Path) -> None:
    texts = [path.read_text()] + [p.read_text() for p in path.parent.glob("*.csv")]
    for text in texts:
        assert not re.search(r'(?<![\w.])/(?:work|home|tmp|root|Users|mnt|check)/', text), path
    absolute = [s for s in json_strings(json.loads(path.read_text())) if s.startswith("/")]
    assert absolute == [], absolute[:5]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.parent.name)
def test_committed_results_come_from_a_clean_commit_in_the_history(path: Path) -> None:
    version = json.loads(path.read_text())["code_version"]
    assert "dirty" not in version and "+" not in version, f"{path}: made from an uncommitted tree ({version})"
    if not (ROOT / ".git").exists():
        pytest.skip("no git history (installed copy)")
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True).stdout.strip()
    if shallow == "true":
        pytest.skip("shallow clone: the history is not here")
    commit = re.search(r"(?:^|-g)([0-9a-f]{7,40})$", version)  # git describe: <sha> or <tag>-<n>-g<sha>
    assert commit, version
    ok = subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit.group(1), "HEAD"],
                        capture_output=True)
    assert ok.returncode == 0, f"{path}: commit {commit.group(1)} is not an ancestor of HEAD"
