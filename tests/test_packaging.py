"""The install maps every source package into the negdpo namespace, and the entry points work from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed_under_negdpo():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"pyproject packages missing {sorted(found - listed)}, extra {sorted(listed - found)}"


def test_bare_names_are_not_importable_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, negdpo.core.config as c; "
            "print(u.find_spec('core') is None, c.bundled_config('demo.yaml').is_file())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


def test_cli_help_is_fast_and_lists_commands(tmp_path):
    out = subprocess.run([sys.executable, "-m", "negdpo", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "build-pairs" in out.stdout and "train-vlm" in out.stdout
    code = "import sys, negdpo.cli; negdpo.cli.main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False")  # dispatching imports nothing heavy


def test_trainer_help_and_setting_errors_import_no_torch(tmp_path):
    """``gen_train.py --help`` / ``clip_train.py --help`` and a bad setting answer before torch is imported."""
    code = ("import sys\n"
            "from negdpo.generator.cli import main as g\nfrom negdpo.preference.clip.cli import main as c\n"
            "for m in (g, c):\n"
            "    try:\n        m(['--help'])\n    except SystemExit:\n        pass\n"
            "rc = g(['--max_train_steps', '0'])\n"
            "print(rc, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2 False", out.stderr[-2000:]
    assert "gen_train: error: max_train_steps=0: must be an integer >= 1" in out.stderr


@pytest.mark.integration  # a subprocess or a training chain: out of the inner loop
@pytest.mark.parametrize("script", ["gen_train.py", "clip_train.py", "seg_train.py"])
def test_entry_scripts_run_from_the_checkout(script):
    """``accelerate launch gen_train.py`` puts the checkout first on sys.path, where the orchestration folder
    ``negdpo/`` is found before the installed mapping: the sub-packages must still import (from the checkout)."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
    # without an editable install's import hook (a wheel install, or none): only the checkout can resolve them
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', "
            "type(f).__name__)]; import negdpo.core, negdpo.configs, negdpo.preference.pairs; print(negdpo.core.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and Path(out.stdout.strip()).parent == ROOT / "core", out.stderr[-2000:]


def test_lock_pins_every_declared_dependency_within_its_range():
    """requirements.lock (README, "Quick start") pins each dependency of pyproject.toml, the dev extra
    included, at one version its declared range accepts; CI installs from it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"requirements.lock: '{line}' is not NAME==VERSION"
        pins[canonicalize_name(name)] = version
    assert len(pins) == len(lines), "requirements.lock names a package twice"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        key = canonicalize_name(req.name)
        assert key in pins, f"requirements.lock lacks {req.name} (pyproject.toml: {spec})"
        assert req.specifier.contains(pins[key], prereleases=True), f"{req.name}=={pins[key]} outside {spec}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.lock" in ci and "pip install -q -e . --no-deps" in ci
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.lock && pip install -e . --no-deps" in readme


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the README's command 2 (the default suite, both tiers, its pytest flags included)."""
    import re

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^pip install -r requirements\.lock .*?python -m pytest (.*)$", readme, re.M)
    assert command, "README: no install-and-test command"
    flags = command.group(1).split()
    ci = re.search(r"python3? -m pytest (.*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert ci and [f for f in ci.group(1).split() if f not in ("-p", "no:cacheprovider")] == flags
