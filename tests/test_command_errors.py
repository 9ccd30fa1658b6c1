"""Every command behaves the same on bad input: one ``<prog>: error: ...`` line on stderr and exit 2.

The commands run in-process through their ``main(argv)`` (a subprocess costs seconds of imports each); the
``negdpo`` logger's handlers are dropped before each call so a log line written during the failure is
captured and counted too. One subprocess checks the real ``python3 -m negdpo`` entry point and ``--debug``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from negdpo.core.console import CommandParser, UsageError, UserError, run_main

ROOT = Path(__file__).resolve().parents[1]
TYPO = "tinyy"

# name -> (prog, module with main(argv), argv that satisfies the required flags)
COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    "phantoms": ("negdpo phantoms", "negdpo.core.phantoms_cli", ["--out", "{tmp}/out"]),
    "import": ("negdpo import", "negdpo.core.importers.cli", ["--format", "busi", "--src", "{data}",
                                                              "--out", "{tmp}/out"]),
    "models": ("negdpo models", "negdpo.core.models.cli", []),
    "sample": ("negdpo sample", "negdpo.generator.sample", ["--data", "{data}", "--out", "{tmp}/out"]),
    "build-pairs": ("negdpo build-pairs", "negdpo.preference.pairs.build_cli", ["--data", "{data}",
                                                                                "--out", "{tmp}/out"]),
    "evaluate": ("negdpo evaluate", "negdpo.segmentation.cli", ["--data", "{data}", "--out", "{tmp}/out"]),
    "pretrain-sam": ("negdpo pretrain-sam", "negdpo.segmentation.sam_pretrain", ["--output_dir", "{tmp}/out"]),
    "train-vlm": ("negdpo train-vlm", "negdpo.segmentation.vlm_train", ["--output_dir", "{tmp}/out"]),
    "study": ("negdpo study", "negdpo.study.cli", ["--work_dir", "{tmp}/work", "--out", "{tmp}/out"]),
    "gen_train": ("gen_train", "negdpo.generator.cli", ["--output_dir", "{tmp}/out"]),
    "clip_train": ("clip_train", "negdpo.preference.clip.cli", ["--output_dir", "{tmp}/out"]),
    "seg_train": ("seg_train", "negdpo.segmentation.prompt_free.train", ["--output_dir", "{tmp}/out"]),
    "autoencoder": ("python -m negdpo.generator.autoencoder", "negdpo.generator.autoencoder",
                    ["--data", "{data}", "--out", "{tmp}/out"]),
    "pairs-report": ("python -m negdpo.preference.pairs.report", "negdpo.preference.pairs.report", []),
    "pickapic": ("python -m negdpo.preference.pairs.pickapic", "negdpo.preference.pairs.pickapic", []),
}
UNTYPED = ("models", "pairs-report", "pickapic")  # no typed option to give a bad value
BAD_VALUE = {name: ["--seed", "x"] for name in COMMANDS if name not in UNTYPED}
MISSING_DATA = {  # the scan folder (or source) a command reads does not exist
    "import": ["--src", "{tmp}/missing"], "sample": ["--data", "{tmp}/missing"],
    "build-pairs": ["--data", "{tmp}/missing"], "evaluate": ["--data", "{tmp}/missing"],
    "pretrain-sam": ["--data", "{tmp}/missing"], "train-vlm": ["--data", "{tmp}/missing"],
    "gen_train": ["--dataset_name", "{tmp}/missing", "--make_phantoms", "false"],
    "clip_train": ["--dataset_name", "{tmp}/missing"], "seg_train": ["--data", "{tmp}/missing"],
    "autoencoder": ["--data", "{tmp}/missing"], "pairs-report": ["{tmp}/missing"],
    "pickapic": ["{tmp}/missing", "{tmp}/out"],
}
TYPO_MODEL = {  # a mistyped preset / model name
    "models": ["--clip", TYPO], "sample": ["--generator", TYPO], "build-pairs": ["--generator", TYPO],
    "evaluate": ["--clip", f"a={TYPO}"], "train-vlm": ["--model", TYPO], "study": ["--clip_model", TYPO],
    "gen_train": ["--pretrained_model_name_or_path", TYPO], "clip_train": ["--pretrained_model_name_or_path", TYPO],
    "seg_train": ["--sam", TYPO], "autoencoder": ["--model", TYPO],
}
YAML_COMMANDS = ("import", "pretrain-sam", "train-vlm", "study", "gen_train", "clip_train", "seg_train")
CASES = ([(n, "unknown flag", ["--no_such_flag", "1"]) for n in COMMANDS]
         + [(n, "bad value", v) for n, v in BAD_VALUE.items()]
         + [(n, "missing data", v) for n, v in MISSING_DATA.items()]
         + [(n, "typo'd model", v) for n, v in TYPO_MODEL.items()]
         + [(n, "bad YAML key", ["--config", "{tmp}/bad.yaml"]) for n in YAML_COMMANDS])


def run(name: str, argv: list[str], tmp_path: Path, data: Path) -> tuple[int, list[str], float]:
    """(exit code, stderr lines, seconds) of ``name``'s ``main(argv)`` run in-process."""
    fill = {"tmp": str(tmp_path), "data": str(data)}
    argv = [a.format(**fill) for a in argv]
    log = logging.getLogger("negdpo")
    log.handlers.clear()  # setup_logging binds a new handler to the captured stderr below
    main = importlib.import_module(COMMANDS[name][1]).main
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue().splitlines(), time.perf_counter() - t0


@pytest.mark.parametrize(("name", "what", "bad"), CASES, ids=[f"{n}-{w}" for n, w, _ in CASES])
def test_user_error_is_one_line_and_exit_2(name, what, bad, phantom_dir, tmp_path):
    (tmp_path / "bad.yaml").write_text("no_such_key: 1\n")
    prog, _, base = COMMANDS[name]
    rc, lines, _ = run(name, base + bad, tmp_path, phantom_dir)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), (rc, lines)
    assert lines[0].strip() != f"{prog}: error:"
    if what == "typo'd model":
        assert TYPO in lines[0]
    if what == "bad YAML key":
        assert "no_such_key" in lines[0]
    assert "Traceback" not in lines[0] and "__main__" not in lines[0]
    assert not (tmp_path / "out").exists(), f"{name}: --out was claimed before the input was checked"


@pytest.mark.parametrize("name", ["phantoms", "sample", "study", "gen_train", "autoencoder"])
def test_debug_reraises_with_the_traceback(name, phantom_dir, tmp_path):
    prog, _, base = COMMANDS[name]
    with pytest.raises(UsageError, match="no_such_flag"):
        run(name, [*base, "--no_such_flag", "1", "--debug"], tmp_path, phantom_dir)


@pytest.mark.integration  # a subprocess or a training chain: out of the inner loop
def test_debug_on_the_command_line_prints_the_traceback(tmp_path):
    """The real entry point: without --debug one line and exit 2, with it Python's traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "negdpo", "sample", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    plain = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert plain.returncode == 2 and plain.stderr.splitlines() == [
        f"negdpo sample: error: {tmp_path / 'missing'}: scan folder does not exist (--debug for the traceback)"]
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ScanFolderError: " in debug.stderr and "scan folder does not exist" in debug.stderr


def test_command_parser_raises_a_usage_error_named_for_the_running_command(capsys):
    """argparse's usage dump and SystemExit(2) become one UsageError; --help still prints and exits 0."""

    def fn(argv: list[str]) -> int:
        p = CommandParser()
        p.add_argument("--n", type=int, required=True)
        return p.parse_args(argv).n

    assert run_main("negdpo demo", fn, ["--n", "3"]) == 3
    assert run_main("negdpo demo", fn, ["--n", "x"]) == 2
    assert capsys.readouterr().err == ("negdpo demo: error: argument --n: invalid int value: 'x' "
                                       "(--help for the options)\n")
    with pytest.raises(SystemExit) as ok:
        run_main("negdpo demo", fn, ["--help"])
    assert ok.value.code == 0 and capsys.readouterr().out.startswith("usage: negdpo demo [-h] --n N")
    with pytest.raises(UsageError, match="required: --n"):
        run_main("negdpo demo", fn, ["--debug"])


def test_model_not_available_is_a_user_error():
    from negdpo.core.models import ModelNotAvailableError

    assert issubclass(ModelNotAvailableError, UserError) and issubclass(ModelNotAvailableError, RuntimeError)

    def fn(argv: list[str]) -> int:
        raise ModelNotAvailableError("unknown CLIP model 'x'")

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_main("clip_train", fn, []) == 2
    assert err.getvalue() == "clip_train: error: unknown CLIP model 'x' (--debug for the traceback)\n"


def test_a_bug_is_not_hidden_as_a_user_error():
    """A programming error (TypeError, a plain RuntimeError) keeps its traceback: only user errors are one line."""
    for exc in (TypeError("bug"), RuntimeError("bug"), KeyError("bug")):
        def fn(argv: list[str], exc: Exception = exc) -> int:
            raise exc

        with pytest.raises(type(exc)):
            run_main("negdpo demo", fn, [])


def test_build_pairs_with_a_missing_adapter_fails_before_any_work(phantom_dir, tmp_path, monkeypatch):
    """Before: 60 failed scans, an empty build, 1093 lines. Now: one line in seconds, no scan read, --out untouched."""
    from negdpo.preference.pairs import build

    def no_scan(*args, **kwargs):
        raise AssertionError("a scan was listed before --adapter was checked")

    monkeypatch.setattr(build, "list_items", no_scan)
    missing = tmp_path / "no_adapter"
    rc, lines, seconds = run("build-pairs", ["--data", "{data}", "--out", "{tmp}/out", "--adapter", str(missing)],
                             tmp_path, phantom_dir)
    assert rc == 2 and lines == [f"negdpo build-pairs: error: --adapter {missing}: no such file or folder "
                                 "(--debug for the traceback)"]
    assert seconds < 10 and not (tmp_path / "out").exists()
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    rc, lines, _ = run("build-pairs", ["--data", "{data}", "--out", "{tmp}/out", "--adapter", str(empty)],
                       tmp_path, phantom_dir)
    assert rc == 2 and len(lines) == 1 and "no pytorch_lora_weights.safetensors" in lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_takes_the_sam_checkpoint_flag_pretrain_sam_prints(tmp_path):
    """pretrain-sam's closing hint says ``--sam tiny --sam_checkpoint PATH``: evaluate parses it (and the deprecated
    dash form, which --help does not list)."""
    from negdpo.core.config import parse_flags
    from negdpo.segmentation.cli import build_parser

    ckpt = str(tmp_path / "sam_pretrained.pth")
    for flag in ("--sam_checkpoint", "--sam-checkpoint"):
        a = parse_flags(build_parser(), ["--data", "d", "--out", "o", "--sam", "tiny", flag, ckpt])
        assert a.sam_checkpoint == ckpt
    assert "--sam-checkpoint" not in build_parser().format_help()
    source = (ROOT / "segmentation" / "sam_pretrain.py").read_text()
    assert "--sam tiny --sam_checkpoint" in source


def test_sample_refuses_a_folder_of_another_command(phantom_dir, tmp_path):
    """`negdpo sample` wrote into any folder, an evaluation's included; now it claims --out as every command does."""
    from negdpo.core.outdir import prepare_output_dir

    evaluation = prepare_output_dir(tmp_path / "eval", "evaluate", settings={"clips": {"a": "tiny"}})
    (evaluation / "report.md").write_text("the evaluation")
    before = sorted(p.name for p in evaluation.iterdir())
    rc, lines, _ = run("sample", ["--data", "{data}", "--out", str(evaluation), "--limit", "1"], tmp_path, phantom_dir)
    assert rc == 2 and len(lines) == 1
    assert "holds the output of `negdpo evaluate`" in lines[0] and "--overwrite_output_dir" in lines[0]
    assert sorted(p.name for p in evaluation.iterdir()) == before
    assert (evaluation / "report.md").read_text() == "the evaluation"


def test_sample_reruns_in_its_own_folder_and_refuses_other_settings(phantom_dir, tmp_path):
    out = tmp_path / "neg"
    args = ["--data", "{data}", "--out", str(out), "--limit", "1", "--sample_steps", "1", "--device", "cpu"]
    rc, _, _ = run("sample", args, tmp_path, phantom_dir)
    written = sorted(p.name for p in out.iterdir())
    assert rc == 0 and ".negdpo-run.json" in written and "sample_args.json" in written
    rc, lines, _ = run("sample", [*args, "--seed", "1"], tmp_path, phantom_dir)  # other settings: refused
    assert rc == 2 and "an earlier `negdpo sample` run with other settings" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == written


def test_every_negdpo_command_is_in_the_error_matrix():
    """A command added to ``negdpo/cli.py`` without a row here would escape the loop above."""
    from negdpo.cli import COMMANDS as CLI

    for name, (module, _) in CLI.items():
        assert name in COMMANDS and COMMANDS[name][0] == f"negdpo {name}", name
        assert importlib.import_module(module).main is importlib.import_module(COMMANDS[name][1]).main, name


def test_unknown_command_is_one_line(capsys):
    from negdpo.cli import main

    assert main(["evalute", "--data", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("negdpo: error: unknown command 'evalute' (commands: phantoms, ")


def test_build_pairs_refuses_a_folder_of_another_command(phantom_dir, tmp_path, monkeypatch):
    from negdpo.core.outdir import prepare_output_dir
    from negdpo.preference.pairs import build

    monkeypatch.setattr(build, "list_items", lambda *a, **k: pytest.fail("a scan was listed"))
    evaluation = prepare_output_dir(tmp_path / "eval", "evaluate", settings={"clips": {"a": "tiny"}})
    (evaluation / "report.md").write_text("the evaluation")
    before = sorted(p.name for p in evaluation.iterdir())
    rc, lines, _ = run("build-pairs", ["--data", "{data}", "--out", str(evaluation)], tmp_path, phantom_dir)
    assert rc == 2 and len(lines) == 1 and "holds the output of `negdpo evaluate`" in lines[0]
    assert sorted(p.name for p in evaluation.iterdir()) == before


def test_pickapic_never_deletes_a_folder_it_did_not_write(tmp_path):
    """The converter removed ``dest`` whatever it held before writing; now a foreign folder is refused."""
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    rc, lines, _ = run("pickapic", [str(tmp_path / "build"), str(dest)], tmp_path, tmp_path)
    assert rc == 2 and len(lines) == 1 and "not a Pick-a-Pic conversion" in lines[0]
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("name", "old", "new", "message"), [
    ("build-pairs", ["--steps", "0"], ["--sample_steps", "0"],
     "--sample_steps must be an integer >= 1 (got 0) (--debug for the traceback)"),
    ("sample", ["--steps", "x"], ["--sample_steps", "x"],
     "argument --sample_steps: invalid int value: 'x' (--help for the options)"),
    ("autoencoder", ["--steps", "x"], ["--max_train_steps", "x"],
     "argument --max_train_steps: invalid int value: 'x' (--help for the options)"),
    ("evaluate", ["--m2ib-steps", "x"], ["--m2ib_steps", "x"],
     "argument --m2ib_steps: invalid int value: 'x' (--help for the options)"),
])
def test_a_deprecated_spelling_fails_as_its_new_flag(name, old, new, message, phantom_dir, tmp_path):
    """An old flag (renamed or dashed) goes through the same one-line error as the new one and names the new flag;
    the only other line is the deprecation warning."""
    prog, _, base = COMMANDS[name]
    rc, lines, _ = run(name, base + new, tmp_path, phantom_dir)
    assert rc == 2 and lines == [f"{prog}: error: {message}"]
    rc, lines, _ = run(name, base + old, tmp_path, phantom_dir)
    assert rc == 2 and lines[-1] == f"{prog}: error: {message}" and len(lines) == 2
    assert f"{old[0]} is deprecated" in lines[0] and f"use {new[0]}" in lines[0]
    assert not (tmp_path / "out").exists()
