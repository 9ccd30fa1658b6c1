"""Run configs: dataclasses filled from a YAML file plus command-line overrides — the one config path.

    args = parse_config(TrainConfig)              # --config configs/demo.yaml --learning_rate 1e-4
    args = parse_config(TrainConfig, ["--config", "x.yaml", "--max_train_steps", "10"])

The YAML supplies defaults; explicit flags win. A YAML may hold ``presets: {name: {...}}`` chosen with
``--preset`` (when the dataclass has a ``preset`` field). Unknown keys, values of the wrong type (in every
preset, selected or not), a key given twice, an empty file and abbreviated flags are errors that name the
key, the value and the file; each dataclass checks its ranges
in ``__post_init__`` (see :func:`check`). Parsing is ``transformers.HfArgumentParser``; ``--help`` shows each
field's ``metadata["help"]``. Flags are spelled with underscores; dash spellings and renamed flags are
deprecated aliases rewritten by :func:`canonical_argv` (argparse commands use it through :func:`parse_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import CommandParser, current_prog

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the key, the value and what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` ``"<key>=<value>: <allowed>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def check_positive(cfg: Any, *keys: str) -> None:
    """Every named int field is >= 1."""
    for key in keys:
        v = getattr(cfg, key)
        check(isinstance(v, int) and v >= 1, key, v, "must be an integer >= 1")


def check_finite_positive(cfg: Any, *keys: str) -> None:
    """Every named float field is finite and > 0."""
    for key in keys:
        v = getattr(cfg, key)
        check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, key, v, "must be a finite number > 0")


def check_probability(cfg: Any, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, key, v, "must be a probability in [0, 1]")


def check_choice(cfg: Any, key: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    v = getattr(cfg, key)
    check(v in choices, key, v, f"must be one of {choices}")


# ---------------------------------------------------------------------------------------------- types
def parse_weights(spec: str, names: typing.Iterable[str], what: str = "judge") -> dict[str, float]:
    """``"a=1,b=0.5,c"`` -> {a: 1.0, b: 0.5, c: 1.0}: names from ``names``, finite weights >= 0, at least one
    positive; anything else raises one ValueError naming ``what`` and the spec."""
    known = sorted(names)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in known:
            raise ValueError(f"unknown {what} '{name}' in '{spec}'; available: {known}")
        try:
            out[name] = float(w) if w.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight of '{name}' in '{spec}' is not a number: '{w}'") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise ValueError(f"weight of '{name}' in '{spec}' must be a finite number >= 0")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"{what} spec '{spec}' names no {what} with a positive weight")
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (bool/int/float/str, ``X | None``, ``list[X]``, ``dict``), else ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}={value!r}: not allowed")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected a number")
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r}: expected a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def check_mapping(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys of ``values`` must be fields of ``cls``; values are coerced to the field types."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(types_)}")
    return {k: coerce(types_[k], v, f"{source}: {k}") for k, v in values.items()}


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (lines {seen[key]} and {line}); give each setting once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)


def read_yaml_config(path: str | Path, preset: str | None = None, cls: type | None = None) -> dict[str, Any]:
    """A YAML mapping; with a ``presets:`` section, the shared keys updated by ``presets[preset]``.

    An empty file, a key given twice and (with ``cls``) an unknown key or a value of the wrong type in *any*
    preset, selected or not, are errors naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = load_yaml(path.read_text())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise ConfigError(f"{path}: empty config file (no settings); write settings in it or leave out --config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"{path}: presets: expected a mapping of preset name -> settings")
    for name, values in presets.items():
        if not isinstance(values, (dict, type(None))):
            raise ConfigError(f"{path}: preset {name!r}: expected a mapping of settings, got {type(values).__name__}")
        if cls is not None:
            check_mapping(cls, {**raw, **(values or {}), "preset": name} if "preset" in _field_types(cls)
                          else {**raw, **(values or {})}, f"{path} (preset {name!r})")
    if presets:
        preset = preset or raw.get("preset") or next(iter(presets))
        if preset not in presets:
            raise ConfigError(f"{path}: no preset {preset!r} (have {sorted(presets)})")
        raw = {**raw, **(presets[preset] or {}), "preset": preset}
    elif preset is not None:
        raw["preset"] = preset
    return raw


def _yaml_value(text: str) -> Any:
    return yaml.safe_load(text)


# ---------------------------------------------------------------------------------------------- flags
DASH_ALIAS_NOTE = ("Flags are spelled with underscores (--max_side); the dash spelling (--max-side) is a deprecated "
                   "alias, accepted for one release.")


def underscore_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Drop every ``--foo-bar`` spelling of an option that also has ``--foo_bar``: one spelling in ``--help``.

    The dash form still parses: :func:`canonical_argv` rewrites it (with a warning) before the parser sees it.
    """
    for action in parser._actions:
        kept = [s for s in action.option_strings
                if not (s.startswith("--") and "-" in s[2:] and "--" + s[2:].replace("-", "_") in action.option_strings)]
        for s in set(action.option_strings) - set(kept):
            parser._option_string_actions.pop(s, None)
        action.option_strings = kept
    if parser.epilog is None:
        parser.epilog = DASH_ALIAS_NOTE
    return parser


def canonical_argv(argv: typing.Sequence[str], parser: argparse.ArgumentParser,
                   renamed: typing.Mapping[str, str] | None = None) -> list[str]:
    """``argv`` with deprecated spellings replaced, one warning line each.

    ``--foo-bar`` becomes ``--foo_bar`` when the parser has ``--foo_bar``; a flag in ``renamed``
    (``{"--steps": "--sample_steps"}``, old -> new, either spelling of the old one) becomes its new name.
    ``--flag=value`` keeps its value; everything after ``--`` is left alone.
    """
    options = set(parser._option_string_actions)
    renamed = {"--" + k[2:].replace("-", "_"): v for k, v in (renamed or {}).items()}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out += argv[i:]
            break
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and flag not in options:
            under = "--" + flag[2:].replace("-", "_")
            new = renamed.get(under) or (under if under in options else None)
            if new is not None:
                _log_deprecated(flag, new)
                arg = new + eq + value
        out.append(arg)
    return out


def _log_deprecated(old: str, new: str) -> None:
    logging.getLogger("negdpo.config").warning("%s is deprecated and will be removed in the next release; use %s",
                                               old, new)


def parse_flags(parser: argparse.ArgumentParser, argv: typing.Sequence[str] | None = None,
                renamed: typing.Mapping[str, str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` of an argparse command, accepting the deprecated spellings (:func:`canonical_argv`)."""
    return parser.parse_args(canonical_argv(list(sys.argv[1:] if argv is None else argv), parser, renamed))


def config_parser(dataclass_type: type, default_config: str | None = None, prog: str | None = None) -> Any:
    """The ``HfArgumentParser`` of a config dataclass (+ ``--config``): its fields' ``help`` metadata is ``--help``.

    Its errors raise :class:`~negdpo.core.errors.UsageError` (one line under ``run_main``); ``prog`` defaults to
    the running command's name."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):  # errors are one line (UsageError), the program is the running command
        error = CommandParser.error

    parser = Parser(dataclass_type, allow_abbrev=False, prog=prog or current_prog())
    parser.add_argument("--config", default=default_config, help="YAML run config (flags override it)")
    types_ = _field_types(dataclass_type)
    if "preset" not in types_:
        parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    helps = field_helps(dataclass_type)
    for action in parser._actions:  # mappings on the command line are YAML/JSON: --gen_extra '{lora_rank: 4}'
        if action.dest in types_ and (types_[action.dest] is dict or typing.get_origin(types_[action.dest]) is dict):
            action.type = _yaml_value
        if action.dest in helps:  # HfArgumentParser's --no_<flag> of a bool field: say what it does
            negated = isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_")
            action.help = f"turn --{action.dest} off" if negated else helps[action.dest]
    return underscore_flags(parser)


def field_helps(dataclass_type: type) -> dict[str, str]:
    """``{field: help}``: a field's ``metadata["help"]``, or, where a subclass only changes the default, the
    help of the same field in the nearest base class that has one (the one description of the option)."""
    out: dict[str, str] = {}
    for cls in reversed(dataclass_type.__mro__):
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.metadata.get("help"):
                    out[f.name] = f.metadata["help"]
    return out


def parse_config(dataclass_type: type[T], argv: list[str] | None = None, default_config: str | None = None,
                 prog: str | None = None) -> T:
    """Parse ``--config FILE`` (YAML) [``--preset NAME``] and flag overrides into one dataclass instance.

    Dash spellings of the fields' flags and the class's ``RENAMED_FLAGS`` (old -> new) are deprecated aliases.
    A bad command line raises :class:`~negdpo.core.errors.UsageError` (one line under ``run_main``).
    """
    parser = config_parser(dataclass_type, default_config, prog)
    argv = canonical_argv(list(sys.argv[1:] if argv is None else argv), parser,
                          getattr(dataclass_type, "RENAMED_FLAGS", None))
    pre = CommandParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    pre.add_argument("--preset", default=None)
    known, rest = pre.parse_known_args(argv)
    types_ = _field_types(dataclass_type)
    if known.config:
        values = read_yaml_config(known.config, known.preset, dataclass_type)
        values = check_mapping(dataclass_type, values, str(known.config))
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from YAML satisfies a required flag
            if action.dest in values:
                action.required = False
    elif known.preset is not None and "preset" in types_:
        parser.set_defaults(preset=known.preset)
    outputs = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    cfg, extra = outputs[0], outputs[-1]  # a namespace holding --config sits in between
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    for name, tp in types_.items():  # flags are typed by argparse; mappings given as flags are checked here
        if tp is dict or typing.get_origin(tp) is dict:
            coerce(tp, getattr(cfg, name), f"--{name}")
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
