"""Every command's ``--help`` documents every option, in one spelling; old spellings still parse.

In-process, through the parser objects the commands parse with (no subprocess per command).
"""

from __future__ import annotations

import argparse
import logging
from typing import ClassVar

import pytest
from negdpo.core.config import canonical_argv, config_parser, field_helps, parse_config, parse_flags
from negdpo.core.errors import UsageError


def _dataclass(module: str, cls: str):
    def make() -> argparse.ArgumentParser:
        import importlib

        return config_parser(getattr(importlib.import_module(module), cls))
    return make


def _function(module: str, fn: str):
    def make() -> argparse.ArgumentParser:
        import importlib

        return getattr(importlib.import_module(module), fn)()
    return make


# every entry of negdpo/cli.py COMMANDS, the three launchers and the autoencoder command
PARSERS = {
    "phantoms": _function("negdpo.core.phantoms_cli", "build_parser"),
    "import": _dataclass("negdpo.core.importers.cli", "ImportConfig"),
    "models": _function("negdpo.core.models.cli", "build_parser"),
    "sample": _function("negdpo.generator.sample", "_parser"),
    "build-pairs": _function("negdpo.preference.pairs.build_cli", "_parser"),
    "evaluate": _function("negdpo.segmentation.cli", "build_parser"),
    "pretrain-sam": _dataclass("negdpo.segmentation.sam_pretrain", "SamPretrainConfig"),
    "train-vlm": _dataclass("negdpo.segmentation.vlm_train", "VlmTrainConfig"),
    "study": _dataclass("negdpo.study.config", "StudyConfig"),
    "gen_train.py": _dataclass("negdpo.generator.config", "GenTrainConfig"),
    "clip_train.py": _dataclass("negdpo.preference.clip.config", "ClipTrainConfig"),
    "seg_train.py": _dataclass("negdpo.segmentation.prompt_free.train", "SegTrainConfig"),
    "autoencoder": _function("negdpo.generator.autoencoder", "_parser"),
}
HIDDEN = {"--preset"}  # parse_config's --preset of a config without presets: accepted, not documented


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_command_is_checked():
    from negdpo.cli import COMMANDS

    assert set(COMMANDS) <= set(PARSERS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_help_and_one_underscore_spelling(command):
    parser = PARSERS[command]()
    text = parser.format_help()
    options = _options(parser)
    assert len(options) >= 5
    for action in options:
        flags = action.option_strings
        if set(flags) <= HIDDEN and action.help == argparse.SUPPRESS:
            continue
        assert isinstance(action.help, str) and action.help.strip() and action.help != argparse.SUPPRESS, flags
        assert all(f.startswith("--") and "-" not in f[2:] for f in flags), f"{command}: {flags} not underscore"
        assert flags[0] in text
    assert "-" not in "".join(f[2:] for a in options for f in a.option_strings)


@pytest.mark.parametrize("command, module, cls", [
    ("evaluate", "negdpo.segmentation.evaluate", "EvalConfig"),
    ("build-pairs", "negdpo.preference.pairs.config", "BuildConfig")])
def test_argparse_commands_over_a_config_take_the_fields_help(command, module, cls):
    """One description per option: a flag whose dest is a config field shows that field's help, verbatim."""
    import importlib

    helps = field_helps(getattr(importlib.import_module(module), cls))
    shared = [a for a in _options(PARSERS[command]()) if a.dest in helps]
    assert len(shared) >= 30
    for action in shared:
        assert action.help == helps[action.dest], action.option_strings


def test_a_subclass_default_keeps_the_base_fields_help():
    from negdpo.core.training import TrainConfig
    from negdpo.segmentation.prompt_free.train import SegTrainConfig

    base = field_helps(TrainConfig)
    assert field_helps(SegTrainConfig)["learning_rate"] == base["learning_rate"]  # SegTrainConfig sets 1e-3
    action = next(a for a in config_parser(SegTrainConfig)._actions if a.dest == "learning_rate")
    assert action.help == base["learning_rate"] and action.default == 1e-3


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_dash_spelling_of_every_option_maps_to_the_underscore_flag(command, caplog):
    parser = PARSERS[command]()
    flags = [a.option_strings[0] for a in _options(parser) if "_" in a.option_strings[0]]
    assert flags
    dashed = ["--" + f[2:].replace("_", "-") for f in flags]
    with caplog.at_level(logging.WARNING, logger="negdpo.config"):
        assert canonical_argv(dashed, parser) == flags
    assert len(caplog.records) == len(flags)
    assert "--max-side is deprecated" in caplog.text or "--max_side" not in flags
    assert canonical_argv(flags, parser) == flags  # the new spelling passes untouched


def test_rewriting_keeps_values_and_stops_at_double_dash():
    parser = PARSERS["evaluate"]()
    argv = ["--m2ib-steps=3", "--prompt_template", "--not-a-flag", "--", "--sam-checkpoint"]
    assert canonical_argv(argv, parser) == ["--m2ib_steps=3", "--prompt_template", "--not-a-flag", "--",
                                            "--sam-checkpoint"]


def test_dash_aliases_parse_to_the_same_config():
    from negdpo.generator.config import GenTrainConfig

    from negdpo.study.config import StudyConfig

    new = parse_config(GenTrainConfig, ["--max_train_steps", "7", "--run_name=x", "--no_sdpo", "--lora_rank", "4",
                                        "--window_preset", "ct-brain"])
    old = parse_config(GenTrainConfig, ["--max-train-steps", "7", "--run-name=x", "--no-sdpo", "--lora-rank", "4",
                                        "--window-preset", "ct-brain"])
    assert old == new and (new.max_train_steps, new.run_name, new.sdpo, new.rank) == (7, "x", False, 4)
    s_new = parse_config(StudyConfig, ["--gen_extra", "{rank: 4}", "--phantoms_lesion_area", "0.01", "0.1"])
    s_old = parse_config(StudyConfig, ["--gen-extra", "{rank: 4}", "--phantoms-lesion-area", "0.01", "0.1"])
    assert s_old == s_new and s_new.gen_extra == {"rank": 4} and s_new.phantoms_lesion_area == [0.01, 0.1]


@pytest.mark.parametrize("command, new, old", [
    ("evaluate", ["--data", "d", "--out", "o", "--m2ib_steps", "3", "--sam_checkpoint", "s.pth", "--no_control",
                  "--max_side", "64", "--skip_bad"],
     ["--data", "d", "--out", "o", "--m2ib-steps", "3", "--sam-checkpoint", "s.pth", "--no-control",
      "--max-side", "64", "--skip-bad"]),
    ("models", ["--sam", "vit_b", "--sam_checkpoint", "x.pth"], ["--sam", "vit_b", "--sam-checkpoint", "x.pth"]),
    ("phantoms", ["--out", "o", "--no_preview", "--pretrain_n", "3", "--healthy_fraction", "0.5"],
     ["--out", "o", "--no-preview", "--pretrain-n", "3", "--healthy-fraction", "0.5"]),
    ("build-pairs", ["--data", "d", "--out", "o", "--chunk_size", "2", "--no_progress"],
     ["--data", "d", "--out", "o", "--chunk-size", "2", "--no-progress"]),
])
def test_argparse_dash_aliases_parse_to_the_same_namespace(command, new, old):
    parser = PARSERS[command]()
    assert parse_flags(parser, old) == parse_flags(parser, new)
    with pytest.raises(UsageError):  # an unknown flag is still refused, in either spelling
        parse_flags(PARSERS[command](), [*new, "--no-such-flag"])


@pytest.mark.parametrize("command, module, dest, value", [
    ("sample", "negdpo.generator.sample", "sample_steps", 5),
    ("build-pairs", "negdpo.preference.pairs.build_cli", "steps", 5),
    ("autoencoder", "negdpo.generator.autoencoder", "max_train_steps", 5)])
def test_renamed_steps_flag_still_works_with_a_warning(command, module, dest, value, caplog):
    import importlib

    renamed = importlib.import_module(module).RENAMED_FLAGS
    base = ["--data", "d", "--out", "o"]
    with caplog.at_level(logging.WARNING, logger="negdpo.config"):
        old = parse_flags(PARSERS[command](), [*base, "--steps", str(value)], renamed)
    assert getattr(old, dest) == value
    assert caplog.messages == [f"--steps is deprecated and will be removed in the next release; use {renamed['--steps']}"]
    new = parse_flags(PARSERS[command](), [*base, renamed["--steps"], str(value)], renamed)
    assert new == old
    with pytest.raises(UsageError):  # without the alias table --steps is not a flag of the command any more
        parse_flags(PARSERS[command](), [*base, "--steps", str(value)])


def test_build_pairs_names_the_new_flag_in_its_errors():
    from negdpo.preference.pairs.config import BuildConfig, settings_diff

    with pytest.raises(ValueError, match=r"^--sample_steps must be an integer >= 1 \(got 0\)$"):
        BuildConfig(data="d", out="o", steps=0).validate()
    assert settings_diff({"steps": 10}, {"steps": 20}) == ["--sample_steps: 10 -> 20"]


def test_a_config_class_can_rename_a_field_flag():
    """``RENAMED_FLAGS`` on a config dataclass: the old flag (either spelling) parses as the new one, with a warning."""
    from dataclasses import dataclass, field

    @dataclass
    class Demo:
        RENAMED_FLAGS: ClassVar[dict[str, str]] = {"--steps": "--sample_steps"}
        sample_steps: int = field(default=1, metadata={"help": "sampling steps"})

    assert parse_config(Demo, ["--steps", "4"]) == parse_config(Demo, ["--sample-steps", "4"]) == Demo(4)
    with pytest.raises(UsageError):
        parse_config(Demo, ["--step", "4"])  # no abbreviations, old or new


def test_canonical_argv_is_idempotent_and_keeps_every_value():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    parser = PARSERS["evaluate"]()
    flags = sorted({f for a in _options(parser) for f in a.option_strings})
    spelled = st.sampled_from(flags).flatmap(lambda f: st.sampled_from([f, "--" + f[2:].replace("_", "-")]))
    token = st.one_of(spelled, st.text("abc-_=0123456789", max_size=6), spelled.map(lambda f: f + "=v-w"))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(token, max_size=8))
    def law(argv):
        once = canonical_argv(argv, parser)
        assert canonical_argv(once, parser) == once and len(once) == len(argv)
        for before, after in zip(argv, once):
            flag, eq, value = before.partition("=")
            if after != before:  # only a dashed flag changes, to its underscore spelling; the value stays
                assert flag.startswith("--") and after == "--" + flag[2:].replace("-", "_") + eq + value
                assert after.partition("=")[0] in flags
    law()
