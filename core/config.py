"""Run configs: dataclasses filled from a YAML file plus command-line overrides.

    args = parse_config(TrainConfig)              # --config configs/demo.yaml --learning_rate 1e-4
    args = parse_config(TrainConfig, ["--config", "x.yaml", "--max_train_steps", "10"])

The YAML supplies defaults; explicit flags win. Unknown YAML keys are an error (typos do not pass
silently). Parsing is ``transformers.HfArgumentParser``; nothing here re-implements it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def parse_config(dataclass_type: type[T], argv: list[str] | None = None, default_config: str | None = None) -> T:
    """Parse ``--config FILE`` (YAML) and overrides into one dataclass instance."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_type)
    parser.add_argument("--config", default=default_config, help="YAML run config (flags override it)")
    if known.config:
        values = yaml.safe_load(Path(known.config).read_text()) or {}
        fields = {f.name for f in dataclasses.fields(dataclass_type)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{known.config}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from YAML satisfies a required flag
            if action.dest in values:
                action.required = False
    outputs = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    cfg, extra = outputs[0], outputs[-1]  # a namespace holding --config sits in between
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def tracker_config(cfg: Any) -> dict[str, Any]:
    """Flat dict of scalars for TensorBoard hparams (lists/None rejected there, diffusers#12107)."""
    out = {}
    for k, v in config_to_dict(cfg).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a run's outputs (atomic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg) | {"code_version": code_version()}, sort_keys=False))
    tmp.replace(path)
    return path


def derive_seed(*keys: object, base: int = 0) -> int:
    """Stable 31-bit seed from keys (e.g. a pair_id): same on every process and machine."""
    digest = hashlib.sha256(json.dumps([base, *map(str, keys)]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) through accelerate."""
    from accelerate.utils import set_seed

    set_seed(seed)


def resolve_device(name: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other name is returned as is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def code_version() -> str:
    """git describe of the checkout if available, else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("negdpo")
    except PackageNotFoundError:
        return "unknown"


def bundled_config(name: str) -> Path:
    """Path of a config shipped with the package (``configs/<name>``), found from a checkout or an install."""
    from importlib.resources import files

    return Path(str(files("negdpo.configs").joinpath(name)))


def default_output_dir(kind: str, run_name: str) -> Path:
    """Output-folder convention: ``$NEGDPO_OUTPUT or ./outputs``/<kind>/<run_name>."""
    return Path(os.environ.get("NEGDPO_OUTPUT", "outputs")) / kind / run_name
