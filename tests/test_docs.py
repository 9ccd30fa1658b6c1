"""The docs are self-contained: nothing points outside the repository, every anchor of docs/method.md cited
in code exists, and every ``negdpo.*`` name that docs/method.md cites is defined in the code."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
SKIP_DIRS = {".git", "outputs", "data", "build", "dist", "node_modules", "__pycache__"}
# Patterns are assembled from pieces so that this file does not match them itself.
OUTSIDE = [
    re.compile("DESIGN" + r"\.md"),  # the team's design notes
    re.compile(r"\.\./" + "shared"),
    re.compile("/work/" + "shared"),
    re.compile("docs/" + r"[\w.-]+\.md"),  # a doc that is not in the repository's docs/ (checked below)
    re.compile("\u00a7" + r"\s*\d"),  # "section N" of some document not in the repository
    re.compile("research " + r"note \d", re.IGNORECASE),
]
CITE = re.compile(r"docs/method\.md#([A-Za-z0-9_-]+)")


def repo_files() -> list[Path]:
    """Text files of the repository (hidden folders, build outputs and data folders pruned, not walked)."""
    out = []
    for folder, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        out += [Path(folder) / f for f in files if Path(f).suffix in SUFFIXES]
    return sorted(out)


def outside_refs(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    return [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for pat in OUTSIDE for m in pat.finditer(text)
            if not (m.group(0).startswith("docs/") and (ROOT / m.group(0)).is_file())]  # the repo's own docs are fine


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def method_anchors() -> set[str]:
    text = re.sub(r"^```.*?^```", "", METHOD.read_text(), flags=re.M | re.S)  # a '#' in a code block is no heading
    return {github_anchor(m.group(2)) for m in re.finditer(r"^(#{1,6})\s+(.+)$", text, re.M)}


def test_github_anchor_rule():
    assert github_anchor("Diffusion-DPO") == "diffusion-dpo"
    assert github_anchor("Method: every formula the code implements") == "method-every-formula-the-code-implements"
    assert github_anchor("Two-stage OT") == "two-stage-ot"


def test_no_references_outside_the_repository():
    files = repo_files()
    assert {METHOD, ROOT / "README.md", ROOT / "CONTRIBUTING.md"} <= set(files) and len(files) > 20
    bad = [hit for p in files for hit in outside_refs(p)]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_outside_patterns_catch_what_they_should(tmp_path):
    f = tmp_path / "x.md"
    f.write_text("see DESIGN" + ".md \u00a7" + "3 and docs/" + "dpo_reference.md, not docs/method.md#conventions")
    hits = [pat.pattern for pat in OUTSIDE if pat.search(f.read_text())]
    assert len(hits) == 3


def test_every_cited_anchor_exists():
    anchors = method_anchors()
    cited = {(p.relative_to(ROOT).as_posix(), a) for p in repo_files() for a in CITE.findall(p.read_text(errors="replace"))}
    internal = {("docs/method.md", a) for a in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", METHOD.read_text())}
    missing = sorted(f"{f}: #{a}" for f, a in cited | internal if a not in anchors)
    assert not missing, "anchors missing from docs/method.md:\n" + "\n".join(missing)
    assert {"diffusion-dpo", "conventions", "data-contracts", "metrics"} <= anchors


def package_dirs() -> dict[str, Path]:
    """``negdpo.*`` package -> source folder, from ``[tool.setuptools.package-dir]`` (nothing is imported)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return {m.group(1): ROOT / m.group(2) for m in re.finditer(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section, re.M)}


def module_file(dotted: str, dirs: dict[str, Path]) -> Path | None:
    """The source file of module ``dotted`` (a ``.py`` file or a package's ``__init__.py``), if any."""
    for pkg in sorted(dirs, key=len, reverse=True):
        if dotted == pkg or dotted.startswith(pkg + "."):
            base = dirs[pkg].joinpath(*dotted[len(pkg):].strip(".").split(".")) if dotted != pkg else dirs[pkg]
            for cand in (base.with_suffix(".py"), base / "__init__.py"):
                if cand.is_file():
                    return cand
            return None
    return None


def _defined(dotted: str, dirs: dict[str, Path]) -> bool:
    """Whether ``negdpo.pkg.module[.name[.attr]]`` names a module or a top-level definition in one."""
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        path = module_file(".".join(parts[:i]), dirs)
        if path is None:
            continue
        rest = parts[i:]
        if not rest:
            return True
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            if rest[0] in names:
                if len(rest) == 1 or not isinstance(node, ast.ClassDef):
                    return len(rest) == 1
                return any(getattr(n, "name", None) == rest[1] for n in node.body)
        return False
    return False


def test_name_resolution_finds_and_rejects():
    dirs = package_dirs()
    assert dirs["negdpo.generator"] == ROOT / "generator"
    assert _defined("negdpo.generator.losses.diffusion_dpo_loss", dirs)
    assert _defined("negdpo.generator.data.Curriculum.pool", dirs)
    assert not _defined("negdpo.generator.losses.no_such_function", dirs)
    assert not _defined("negdpo.generator.data.Curriculum.no_such_method", dirs)
    assert not _defined("negdpo.no_such_package.module", dirs)


def test_cited_code_names_exist():
    names = sorted(set(re.findall(r"`(negdpo(?:\.\w+)+)", METHOD.read_text())))
    assert len(names) > 30
    dirs = package_dirs()
    missing = [n for n in names if not _defined(n, dirs)]
    assert not missing, "docs/method.md cites names the code does not define:\n" + "\n".join(missing)
