"""The build folder as a Hub-style dataset repo: recorded settings, dataset card, overwrite.

* ``OUT/build_settings.json``: the settings that shape the rows (``config.row_settings``). A rerun
  with other ones is refused (it would mix rows) unless ``--overwrite_output_dir`` clears the build.
* ``OUT/README.md``: the dataset card. Its YAML header has one ``configs:`` entry per kind with
  ``data_files`` per split, so ``datasets.load_dataset(OUT, "<kind>")`` works (``generator`` is the
  default config); the body states the columns, the generator, the judges, the counts and the settings.
  User text (paths, model names, prompts) is escaped for markdown and HTML.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path

from negdpo.core.faults import fault_point

from .config import settings_diff, settings_sha
from .schema import KINDS, SPLITS, features_for, shard_dir, shard_path

SETTINGS_FILE = "build_settings.json"
CARD_FILE = "README.md"
# everything a build writes (``clear_output`` removes these and nothing else)
BUILD_ENTRIES = (SETTINGS_FILE, CARD_FILE, "build_summary.json", "report", "pickapic", "data", ".empty_chunks",
                 ".hf_cache", *KINDS)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


class SettingsMismatchError(ValueError):
    """The output folder holds a build with other row settings."""


def md_escape(text: object) -> str:
    """Text safe inside markdown and its HTML rendering: HTML-escaped, markdown specials backslashed,
    one line."""
    s = html.escape(str(text), quote=True).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", s)


def _safe_json(obj: object) -> str:
    """JSON whose strings cannot close a code fence or open an HTML tag (valid JSON escapes)."""
    return (json.dumps(obj, indent=1, sort_keys=True, default=str).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026").replace("`", "\\u0060"))


def _py_str(text: str) -> str:
    """A Python string literal for a code fence: one line, no backtick or angle bracket (``\\uXXXX`` escapes)."""
    return _safe_json(str(text))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_settings(out: str | Path) -> dict | None:
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["settings"]
    except (ValueError, KeyError) as err:
        raise SettingsMismatchError(f"{path}: unreadable ({err}); use a new --out or --overwrite_output_dir") from None


def check_settings(out: str | Path, settings: dict, shard_shas: set[str]) -> None:
    """Raise if ``out`` was built with other row settings (recorded file, or the shards' hashes)."""
    hint = "use a new --out, or --overwrite_output_dir to discard the existing build"
    old = read_settings(out)
    if old is not None and old != settings:
        diff = "; ".join(settings_diff(old, settings))
        raise SettingsMismatchError(f"{out} was built with other settings ({diff}); {hint}")
    stray = shard_shas - {settings_sha(settings)}
    if stray:
        raise SettingsMismatchError(f"{out} holds shards built with other settings (settings hash {sorted(stray)} "
                                    f"!= {settings_sha(settings)}); {hint}")


def record_settings(out: str | Path, settings: dict) -> None:
    """Write ``OUT/build_settings.json`` once (same content from every process: idempotent)."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        _atomic_write(path, json.dumps({"settings": settings, "sha": settings_sha(settings)}, indent=1,
                                       sort_keys=True))


def clear_output(out: str | Path) -> list[str]:
    """Remove what a build wrote in ``out`` (only the names in ``BUILD_ENTRIES``); returns them."""
    removed = []
    for name in BUILD_ENTRIES:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def card_configs(out: str | Path) -> list[dict]:
    """``configs:`` entries: one per kind with shards, ``data_files`` for the splits present."""
    configs = []
    for kind in KINDS:
        d = Path(shard_dir(out, kind))
        present = {p.name.split("-", 1)[0] for p in d.glob("*.parquet")} if d.is_dir() else set()
        splits = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
        if not splits:
            continue
        configs.append({"config_name": kind, "data_files": [{"split": s, "path": f"{shard_path(kind)}/{s}-*.parquet"}
                                                            for s in splits]})
    if configs:
        configs[0]["default"] = True
    return configs


def _columns(kind: str) -> str:
    feats = features_for(kind)
    return ", ".join(f"`{n}` ({getattr(f, 'dtype', type(f).__name__)})" for n, f in feats.items())


def write_card(out: str | Path, settings: dict, counts: dict[str, dict[str, int]], judge_spec: str,
               gen_models: dict[str, str], dropped: dict[str, int]) -> Path:
    """Write ``OUT/README.md`` (atomically)."""
    import yaml

    out = Path(out)
    header = {"configs": card_configs(out), "tags": ["medical", "preference", "dpo", "negdpo"],
              "pretty_name": "negdpo preference pairs"}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# Preference pairs: {md_escape(out.name)}", "",
             "Built by `negdpo build-pairs` (generate candidate tumour-free fills of positive scans, judge them, "
             "write preference pairs). One config per pair kind; splits `train` / `validation` / `test` "
             "(subject-level).", "", "```python", "import datasets",
             f"dsd = datasets.load_dataset({_py_str(out.name)}, \"generator\")  # or clip_t2i, clip_i2t",
             f"dsd = datasets.load_from_disk({_py_str(out.name + '/generator')})  # the same rows", "```", "",
             "## Counts", "", "| config | " + " | ".join(SPLITS) + " |", "| --- |" + " --- |" * len(SPLITS)]
    for kind in KINDS:
        c = counts.get(kind, {})
        lines.append(f"| {kind} | " + " | ".join(str(c.get(s, 0)) for s in SPLITS) + " |")
    drop = ", ".join(f"{md_escape(k)}: {v}" for k, v in sorted(dropped.items())) or "none"
    lines += ["", f"Scans without pairs, by reason: {drop}.", "", "## Generator and judges", ""]
    lines += [f"- source {md_escape(s)}: {md_escape(m)}" for s, m in gen_models.items()]
    lines += [f"- judges (composite score, `label_source` column): {md_escape(judge_spec)}", "", "## Columns", ""]
    lines += [f"- **{kind}**: {_columns(kind)}" for kind in KINDS]
    lines += ["", "## Build settings", "", "A rerun with other settings is refused (rows would mix).", "",
              "```json", _safe_json(settings), "```", ""]
    fault_point("card")
    _atomic_write(out / CARD_FILE, "\n".join(lines))
    return out / CARD_FILE
