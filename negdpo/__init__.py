"""negdpo: the command-line front end over core, generator, preference and segmentation."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Installed, the sub-packages (negdpo.core, negdpo.generator, ...) are the checkout's top-level folders mapped by
# pyproject's package-dir. When a script runs from the checkout itself (``accelerate launch gen_train.py``,
# ``python benchmarks/run_all.py``), the repository root is first on sys.path and this folder is found before the
# installed mapping; the same mapping then comes from the checkout's root, so both ways import the same files.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "core" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (__path__ is set for packages)
