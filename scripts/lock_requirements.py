"""Write ``requirements.lock``: the exact versions of negdpo's dependencies installed here.

    python scripts/lock_requirements.py [--extras dev] [--out requirements.lock]

Walks the dependency closure of the installed ``negdpo`` (its ``Requires-Dist``, with the given extras, and
theirs, recursively, markers evaluated for this interpreter) and pins each distribution at its installed
version -- what ``pip freeze --exclude-editable`` would print for a virtual environment holding only
negdpo, without whatever else the interpreter has. Install from it with
``pip install -r requirements.lock && pip install -e . --no-deps`` (README, "Quick start").
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""}))


def _version(key: str, specs: list[tuple[str, SpecifierSet]]) -> str:
    """The installed version of ``key`` that every requirement on it accepts. The first copy on ``sys.path``
    wins, as on import, unless it fails a requirement (a virtual environment's own old ``setuptools``
    shadowing the interpreter's) and a later copy passes."""
    versions = [d.version for d in metadata.distributions(name=key)]
    for version in versions:
        if all(spec.contains(version, prereleases=True) for _, spec in specs):
            return version
    wanted = ", ".join(f"{who} wants {spec}" for who, spec in specs if str(spec))
    raise SystemExit(f"lock_requirements: no installed {key} ({', '.join(versions)}) satisfies {wanted}")


def closure(root: str = "negdpo", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """{canonical name: installed version} of everything ``root[extras]`` needs here (``root`` excluded)."""
    seen: dict[str, set[str]] = {}
    specs: dict[str, list[tuple[str, SpecifierSet]]] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted_extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen and wanted_extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(wanted_extras)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError as err:
            raise SystemExit(f"lock_requirements: {name} is required but not installed") from err
        for line in requires:
            req = Requirement(line)
            if _wanted(req, wanted_extras):
                specs.setdefault(canonicalize_name(req.name), []).append((key, req.specifier))
                todo.append((req.name, set(req.extras)))
    seen.pop(canonicalize_name(root))
    return {key: _version(key, specs.get(key, [])) for key in seen}


def render(pins: dict[str, str], extras: tuple[str, ...]) -> str:
    head = (f"# negdpo[{','.join(extras)}]: exact versions of every dependency (scripts/lock_requirements.py).\n"
            f"# Made on Python {platform.python_version()}, {sys.platform} {platform.machine()}; README, \"Quick start\".\n"
            "# Install: pip install -r requirements.lock && pip install -e . --no-deps\n")
    return head + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extras", default="dev", help="comma-separated extras of negdpo to include (default dev)")
    p.add_argument("--out", default=str(ROOT / "requirements.lock"), help="file to write")
    args = p.parse_args(argv)
    extras = tuple(e for e in args.extras.split(",") if e)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(closure("negdpo", extras), extras))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
