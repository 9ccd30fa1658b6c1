"""The fault probe's findings (issue 25), one or a few tests per item, each failing on the code before its fix.

1 NaN-stop advice works (a new --learning_rate replaces the checkpoint's); 2 torn metrics.jsonl; 3 build-pairs
folder lock and process group; 4 stable adapter hash; 5 a failed start frees the folder; 6 one-line errors
(corrupt pair dataset, resume with another --rank, disk full); 7 config checks; 8 linear label trimming;
9 the smaller ones.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLIP_FAST = dict(loss="dpo+clip", train_batch_size=4, eval_batch_size=8, report_to="none", tsne=False,
                 progress_bar=False, logging_steps=1, lr_scheduler="constant")


@pytest.fixture(autouse=True)
def _fresh_console_handler():
    """``setup_logging`` binds its handler to the stderr of the first test that called it; these tests read
    stderr, so each gets a handler of its own (restored afterwards)."""
    log = logging.getLogger("negdpo")
    saved, propagate, level = log.handlers[:], log.propagate, log.level
    log.handlers.clear()
    yield
    log.handlers[:] = saved
    log.propagate, log.level = propagate, level


@contextlib.contextmanager
def records(name: str):
    """Log records of logger ``name`` (a handler on the logger itself: ``negdpo`` does not propagate)."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    log = logging.getLogger(name)
    handler, level = Keep(level=logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clip_args(data: Path, out: Path, **extra) -> list[str]:
    settings = {**CLIP_FAST, "dataset_name": str(data), "output_dir": str(out), **extra}
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- 1 -----------------------------------------------------------------------------------------------
def test_item1_resume_runs_the_new_learning_rate(phantom_dir, tmp_path):
    """The NaN stop says: lower --learning_rate and resume. load_state restored the old lr, so the resumed
    steps ran at 1e-3 while config.yaml said 1e-4."""
    from negdpo.preference.clip.train import ClipTrainConfig, train

    out = tmp_path / "run"
    base = dict(CLIP_FAST, dataset_name=str(phantom_dir), output_dir=str(out))
    train(ClipTrainConfig(max_train_steps=2, checkpointing_steps=2, learning_rate=1e-3, save_final=False, **base))
    with records("negdpo.core.training") as logs:
        train(ClipTrainConfig(max_train_steps=4, learning_rate=1e-4, resume_from_checkpoint="latest", **base))
    lrs = {r["step"]: r["lr"] for r in _steps(out / "metrics.jsonl")}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-4, 4: 1e-4}
    said = [r.getMessage() for r in logs if "learning_rate" in r.getMessage()]
    assert len(said) == 1 and "0.001 (checkpoint) -> 0.0001" in said[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 1e-4


def test_item1_new_learning_rate_keeps_the_schedule_position():
    """A linear warmup/decay resumed at step 3 of 10 with a new base lr: lr = new base x factor(3), exactly."""
    from types import SimpleNamespace

    from negdpo.core.training import apply_learning_rate
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    factor = sched.lr_lambdas[0](3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * factor)
    run = SimpleNamespace(accelerator=SimpleNamespace(_optimizers=[opt], _schedulers=[sched]))
    apply_learning_rate(run, 4e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * factor, rel=1e-12)
    assert sched.base_lrs == [pytest.approx(4e-3)] and sched.get_last_lr() == [pytest.approx(4e-3 * factor)]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * sched.lr_lambdas[0](4), rel=1e-12)


def test_item1_nan_stop_advice_names_the_fix():
    from negdpo.core.training import stop_nonfinite

    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)

    import tempfile
    from types import SimpleNamespace

    with tempfile.TemporaryDirectory() as d:
        run = SimpleNamespace(accelerator=Acc(), out=Path(d), kind="x", settings={})
        msg = str(stop_nonfinite(run, 5, "loss became nan", None))
    assert "lower --learning_rate (it replaces the checkpoint's" in msg and "--resume_from_checkpoint" in msg


# -- 2 -----------------------------------------------------------------------------------------------
def _fake_run(out: Path):
    from types import SimpleNamespace

    return SimpleNamespace(is_main=True, out=out, accelerator=SimpleNamespace(num_processes=1, log=lambda *a, **k: None))


def test_item2_torn_last_metrics_line_is_dropped_with_one_warning(tmp_path):
    """A full disk during an append left '{"step": 3, "loss": 0.' and every resume failed on it."""
    from negdpo.core.training import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "loss": 0.')
    with records("negdpo") as logs:
        log = MetricsLog(_fake_run(tmp_path), start_step=2)
    assert [r.getMessage() for r in logs if r.levelno == logging.WARNING] == [
        f"{path}: dropped a torn last line (22 characters; an interrupted write)"]
    log.log(3, {"loss": 0.125})
    assert _steps(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]


def test_item2_bad_line_inside_the_log_names_the_file_and_line(tmp_path):
    from negdpo.core.training import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a JSON record"):
        MetricsLog(_fake_run(tmp_path), start_step=3)


def test_item2_a_short_write_leaves_no_partial_line(tmp_path, monkeypatch):
    """One os.write per record; a disk that takes half of it gets the half truncated away (ENOSPC raised)."""
    from negdpo.core import metrics_log

    path = tmp_path / "metrics.jsonl"
    log = metrics_log.MetricsLog(_fake_run(tmp_path))
    log.log(1, {"loss": 1.0})
    calls = []
    real = os.write

    def half(fd, data):
        calls.append(len(data))
        return real(fd, data[: len(data) // 2])

    monkeypatch.setattr(metrics_log.os, "write", half)
    with pytest.raises(OSError) as err:
        log.log(2, {"loss": 0.5})
    assert err.value.errno == errno.ENOSPC and len(calls) == 1
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'


# -- 3 -----------------------------------------------------------------------------------------------
BUILD = ["--splits", "test", "--judges", "contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2", "--k", "2",
         "--steps", "2", "--batch_items", "1", "--chunk_size", "1", "--no_progress", "--no_report"]


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_item3_second_build_into_a_folder_in_use_is_refused(phantom_dir, tmp_path, live_pid, capsys):
    """Two builds into one folder both did all the work and raced in the merge; now the second is refused."""
    from negdpo.core.outdir import _start_time
    from negdpo.preference.pairs.build_cli import main

    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": live_pid, "host": socket.gethostname(), "start": _start_time(live_pid)}
    (out / ".negdpo.lock").write_text(json.dumps(lock))
    assert main(["--data", str(phantom_dir), "--out", str(out), *BUILD]) == 2
    line = _one_error_line(capsys.readouterr().err, "negdpo build-pairs")
    assert f"in use by another run (pid {live_pid})" in line
    assert sorted(p.name for p in out.iterdir()) == [".negdpo.lock"]  # nothing built, nothing written


def test_item3_processes_without_a_group_are_refused(phantom_dir, tmp_path, monkeypatch):
    """torchrun on CPU without --device cpu: two processes, each alone, each running the whole build."""
    from accelerate import PartialState
    from negdpo.preference.pairs.build import BuildConfig, check_process_group, cpu_only, run_build

    PartialState()  # this process: one process, no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    cfg = BuildConfig(data=str(phantom_dir), out=str(out), splits="test", generator="tiny", k=2, steps=2,
                      clip="tiny", progress=False)
    with pytest.raises(ValueError, match="2 processes but they form no process group") as err:
        run_build(cfg, report=False)
    assert "\n" not in str(err.value) and not out.exists()
    check_process_group(2, world_size=2)  # a real group of two is fine
    check_process_group(1, world_size=1)
    assert cpu_only("cpu") and cpu_only("auto") == (not torch.cuda.is_available()) and not cpu_only("cuda")


# -- 4 -----------------------------------------------------------------------------------------------
class OtherOrderSet(set):
    """A set iterating in another order, as the same set does under another PYTHONHASHSEED."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), reverse=True))


def test_item4_resaving_the_same_adapter_keeps_its_hash(tmp_path):
    """target_modules were written in set order (hash seed) and safetensors writes its header metadata in hash
    order: two saves of the same weights hashed differently, so build-pairs refused to resume its own build."""
    from negdpo.generator.lora_io import save_lora
    from negdpo.generator.pipeline import add_lora, load_components
    from negdpo.preference.pairs.generate import adapter_sha
    from safetensors import safe_open

    unet = load_components("tiny").unet
    with torch.random.fork_rng():
        torch.manual_seed(0)
        add_lora(unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"])
    config = unet.peft_config["default"]
    save_lora(unet, tmp_path / "a")
    config.target_modules = OtherOrderSet(config.target_modules)
    save_lora(unet, tmp_path / "b")
    metas = []
    for name in ("a", "b"):
        targets = json.loads((tmp_path / name / "adapter_config.json").read_text())["target_modules"]
        assert targets == sorted(targets) and "conv1" in targets
        with safe_open(str(tmp_path / name / "pytorch_lora_weights.safetensors"), framework="pt") as f:
            metas.append(f.metadata()["lora_adapter_metadata"])
    assert metas[0] == metas[1]  # the saved LoraConfig text no longer depends on the set's order
    assert adapter_sha(str(tmp_path / "a")) == adapter_sha(str(tmp_path / "b")) != ""


def test_item4_the_hash_follows_the_content(tmp_path):
    from negdpo.generator.lora_io import lora_content_sha
    from safetensors.torch import save_file

    a = {"unet.x.lora_A.weight": torch.ones(2, 3), "unet.x.lora_B.weight": torch.zeros(3, 2)}
    meta = {"target_modules": ["to_q", "conv1"], "r": 2}
    save_file(a, tmp_path / "a.safetensors", metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    meta_b = {"r": 2, "target_modules": ["conv1", "to_q"]}
    save_file(dict(reversed(a.items())), tmp_path / "b.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(meta_b), "format": "pt"})
    assert lora_content_sha(tmp_path / "a.safetensors") == lora_content_sha(tmp_path / "b.safetensors")
    save_file({**a, "unet.x.lora_B.weight": torch.full((3, 2), 1e-7)}, tmp_path / "c.safetensors",
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    assert lora_content_sha(tmp_path / "c.safetensors") != lora_content_sha(tmp_path / "a.safetensors")


# -- 5 -----------------------------------------------------------------------------------------------
def test_item5_clip_failed_start_leaves_the_folder_usable(phantom_dir, tmp_path, capsys):
    """The trainer claimed the folder and wrote config.yaml before reading the data: the corrected command was
    refused ('holds an earlier run'; in-process also 'in use')."""
    from negdpo.preference.clip.cli import main

    empty = tmp_path / "not_a_dataset"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(_clip_args(empty, out, max_train_steps=1, save_final=False)) == 2
    line = _one_error_line(capsys.readouterr().err, "clip_train")
    assert str(empty) in line
    assert not out.exists() or not any(out.iterdir())
    assert main(_clip_args(phantom_dir, out, max_train_steps=1, save_final=False)) == 0
    assert [r["step"] for r in _steps(out / "metrics.jsonl")] == [1]


def test_item5_gen_train_failed_start_leaves_the_folder_usable(phantom_dir, tmp_path, capsys):
    from negdpo.generator.cli import main

    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(dict(pretrained_model_name_or_path="tiny", train_batch_size=2, max_train_steps=1,
                                       report_to="none", eval_pairs=0, validation_steps=0, num_validation_images=0,
                                       cache_latents=True, sdpo=False)))
    out = tmp_path / "run"
    for bad in (tmp_path / "missing", tmp_path / "empty"):  # checked before the claim / failing after it
        if bad.name == "empty":
            bad.mkdir()
        assert main(["--config", str(cfg), "--dataset_name", str(bad), "--output_dir", str(out)]) == 2
        assert str(bad) in _one_error_line(capsys.readouterr().err, "gen_train")
        assert not out.exists() or not any(out.iterdir())
    assert main(["--config", str(cfg), "--dataset_name", str(phantom_dir), "--output_dir", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_item5_a_run_that_trained_keeps_its_folder(tmp_path):
    """Released on failure only when nothing was trained: logged steps or checkpoints stay for --resume."""
    from negdpo.core.training import TrainConfig, finish_run, start_run, trainer_scope

    out = tmp_path / "r"
    with pytest.raises(RuntimeError, match="boom"), trainer_scope():
        start_run(TrainConfig(output_dir=str(out), report_to="none"), "x")
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("boom")
    assert (out / "config.yaml").is_file() and not (out / ".negdpo.lock").exists()
    finish_run(start_run(TrainConfig(output_dir=str(out), report_to="none", resume_from_checkpoint="latest"), "x"))


def test_item5_a_refused_start_never_cleans_the_folder_of_the_run_holding_it(tmp_path, live_pid):
    from negdpo.core.outdir import LOCK, MARKER, OutputDirLockedError, _start_time
    from negdpo.core.training import TrainConfig, start_run, trainer_scope

    out = tmp_path / "r"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(),
                                        "start": _start_time(live_pid)}))
    (out / MARKER).write_text(json.dumps({"owner": "x", "fingerprint": None}))
    with pytest.raises(OutputDirLockedError), trainer_scope():
        start_run(TrainConfig(output_dir=str(out), report_to="none"), "x")
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER])


# -- 6 -----------------------------------------------------------------------------------------------
def _pair_dataset(path: Path, n: int = 8) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2 * n)]
    ds = datasets.Dataset.from_dict(
        {"prompt": ["A scan with a tumour."] * n, "chosen": imgs[:n], "rejected": imgs[n:]},
        features=datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                    "rejected": datasets.Image()}))
    ds.save_to_disk(str(path))
    return path


def test_item6_corrupt_pair_dataset_is_one_line_naming_the_file(tmp_path, capsys):
    from negdpo.preference.clip.cli import main

    data = _pair_dataset(tmp_path / "pairs")
    (arrow,) = data.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    assert main(_clip_args(data, tmp_path / "run", max_train_steps=1)) == 2
    line = _one_error_line(capsys.readouterr().err, "clip_train")
    assert f"{arrow}: unreadable pair dataset" in line


def test_item6_undecodable_image_names_the_row(tmp_path):
    import datasets
    from negdpo.preference.clip.data import PairDataError, pairs_from_dataset

    data = _pair_dataset(tmp_path / "pairs", n=4)
    ds = datasets.load_from_disk(str(data)).cast_column("chosen", datasets.Image(decode=False))
    rows = ds.to_list()
    rows[2]["chosen"] = {"bytes": b"\x89PNG not really", "path": None}
    bad = datasets.Dataset.from_list(rows, features=ds.features).cast_column("chosen", datasets.Image())
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(PairDataError, match=r"bad: unreadable pair dataset \(row 2\): UnidentifiedImageError"):
        pairs_from_dataset(tmp_path / "bad", "train")


def test_item6_resume_with_another_rank_says_what_differs(phantom_dir, tmp_path, capsys):
    from negdpo.preference.clip.cli import main

    out = tmp_path / "run"
    args = dict(finetune="lora", checkpointing_steps=1, save_final=False)
    assert main(_clip_args(phantom_dir, out, max_train_steps=1, rank=4, **args)) == 0
    capsys.readouterr()
    assert main(_clip_args(phantom_dir, out, max_train_steps=2, rank=8, resume_from_checkpoint="latest", **args)) == 2
    line = _one_error_line(capsys.readouterr().err, "clip_train")
    assert "cannot resume from" in line and "checkpoint-1" in line and "--rank 4 -> 8" in line
    assert not (out / ".negdpo.lock").exists()


def test_item6_disk_full_is_one_line_and_the_rerun_recovers(phantom_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC on the third metrics append: one line naming the folder; the rerun with --resume_from_checkpoint
    latest finishes with every step logged once."""
    from negdpo.core import metrics_log
    from negdpo.preference.clip.cli import main

    real, calls = os.write, []

    def full(fd, data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    out = tmp_path / "run"
    args = _clip_args(phantom_dir, out, max_train_steps=4, checkpointing_steps=1, save_final=False,
                      resume_from_checkpoint="latest")
    with monkeypatch.context() as m:
        m.setattr(metrics_log.os, "write", full)
        assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "clip_train")
    assert f"No space left on device in {out}" in line and "--resume_from_checkpoint latest" in line
    assert main(args) == 0
    assert [r["step"] for r in _steps(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_item6_disk_full_in_build_pairs_is_one_line(phantom_dir, tmp_path, monkeypatch, capsys):
    from negdpo.preference.pairs import build
    from negdpo.preference.pairs.build_cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(build, "write_shard", full)
    out = tmp_path / "out"
    assert main(["--data", str(phantom_dir), "--out", str(out), *BUILD]) == 2
    line = _one_error_line(capsys.readouterr().err, "negdpo build-pairs")
    assert f"No space left on device in {out}" in line
    assert not (out / ".negdpo.lock").exists()


# -- 7 -----------------------------------------------------------------------------------------------
def _cfg_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_item7_duplicate_yaml_key_is_an_error(tmp_path):
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.core.training import TrainConfig

    path = _cfg_file(tmp_path, "learning_rate: 1.0e-4\nseed: 1\nlearning_rate: 1.0e-2\n")
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'learning_rate' \(lines 1 and 3\)"):
        parse_config(TrainConfig, ["--config", path])
    nested = _cfg_file(tmp_path, "presets:\n  a:\n    seed: 1\n    seed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        parse_config(TrainConfig, ["--config", nested])


def test_item7_empty_yaml_is_an_error(tmp_path):
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.core.training import TrainConfig

    for text in ("", "# only a comment\n"):
        path = _cfg_file(tmp_path, text)
        with pytest.raises(ConfigError, match=rf"{path}: empty config file"):
            parse_config(TrainConfig, ["--config", path])


def test_item7_unselected_presets_are_validated(tmp_path):
    from dataclasses import dataclass

    from negdpo.core.config import ConfigError, parse_config

    @dataclass
    class Cfg:
        preset: str = "a"
        steps: int = 1

    good = "presets:\n  a: {steps: 2}\n  b: {steps: 3}\n"
    assert parse_config(Cfg, ["--config", _cfg_file(tmp_path, good), "--preset", "a"]).steps == 2
    for bad, why in (("  b: {steps: many}\n", "b'\\): steps='many': expected an integer"),
                     ("  b: {stepz: 3}\n", r"b'\): unknown key\(s\) \['stepz'\]"),
                     ("  b: [1, 2]\n", "preset 'b': expected a mapping")):
        path = _cfg_file(tmp_path, "presets:\n  a: {steps: 2}\n" + bad)
        with pytest.raises(ConfigError, match=why):
            parse_config(Cfg, ["--config", path, "--preset", "a"])


# -- 8 -----------------------------------------------------------------------------------------------
def test_item8_a_21000_character_label_trims_fast_and_fits():
    """Trimming one character per measurement was quadratic: 4,000 characters took 21 s."""
    import numpy as np
    from negdpo.core.figures import _fit, _text_size, font, render_grid
    from PIL import Image, ImageDraw

    text = ("a lesion-free axial T1 MRI slice, " * 700)[:21000]
    draw, f = ImageDraw.Draw(Image.new("RGB", (1, 1))), font(18)
    t0 = time.perf_counter()
    fitted = _fit(draw, text, f, 256)
    assert time.perf_counter() - t0 < 1.0
    assert fitted.endswith("…") and text.startswith(fitted[:-1])
    assert _text_size(draw, fitted, f)[0] <= 256 < _text_size(draw, text[: len(fitted)] + "…", f)[0]
    t0 = time.perf_counter()
    render_grid([[np.zeros((64, 64))]], column_labels=[text], row_labels=[text], tile_text=[[text]], title=text)
    assert time.perf_counter() - t0 < 1.0


# -- 9 -----------------------------------------------------------------------------------------------
def test_item9_brackets_in_the_output_path_merge(tmp_path):
    """The merge handed shard paths to load_dataset as glob patterns: 'pairs[1]' matched nothing."""
    import datasets
    from negdpo.preference.pairs.schema import shard_dir
    from negdpo.preference.pairs.shards import merge_shards

    out = tmp_path / "pairs[1]*?"
    shards = Path(shard_dir(out, "generator"))
    shards.mkdir(parents=True)
    datasets.Dataset.from_dict({"pair_id": ["b", "a"], "x": [2, 1]}).to_parquet(str(shards / "test-0.parquet"))
    datasets.Dataset.from_dict({"pair_id": ["c"], "x": [3]}).to_parquet(str(shards / "train-0.parquet"))
    assert merge_shards(out, ["generator"]) == {"generator": {"test": 2, "train": 1}}
    assert datasets.load_from_disk(str(out / "generator"))["test"]["pair_id"] == ["a", "b"]


def test_item9_folder_name_with_newlines_stays_inside_the_card_fence(tmp_path):
    import ast

    from negdpo.preference.pairs.card import write_card

    out = tmp_path / 'x\n```\n<script>alert(1)<\\script>\n"'
    out.mkdir()
    text = write_card(out, {"k": 2}, {}, "contrast=1", {"inpaint": "tiny"}, {}).read_text()
    body = text.split("```python\n", 1)[1].split("\n```\n", 1)[0]
    ast.parse(body)  # still Python: the name did not close the fence
    assert "<script>" not in text and text.count("```") == 4


def test_item9_data_without_split_folders_is_an_error(tmp_path, capsys):
    from negdpo.preference.pairs.build_cli import main

    data = tmp_path / "scans"
    (data / "images").mkdir(parents=True)
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), "--no_progress"]) == 2
    assert "no split folders" in _one_error_line(capsys.readouterr().err, "negdpo build-pairs")


def test_item9_broken_image_symlinks_and_unmatched_prompts_are_reported(phantom_dir, tmp_path):
    import shutil

    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.preference.pairs.items import list_items

    data = tmp_path / "scans"
    shutil.copytree(phantom_dir, data)
    link = data / "test_images" / "gone_0.png"
    link.symlink_to(tmp_path / "nowhere.png")
    prompts = json.loads((data / "prompts.json").read_text())
    (data / "prompts.json").write_text(json.dumps({**prompts, "typo_0001.png": "A scan."}))
    with records("negdpo.preference.pairs.items") as logs:
        items, skipped = list_items(BuildConfig(data=str(data), out=str(tmp_path / "o"), splits="test"))
    assert items and [f for f, _ in skipped] == [str(link)]
    assert "not a readable file" in skipped[0][1]
    said = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert len(said) == 1 and "1 key(s) match no image" in said[0] and "'typo_0001.png'" in said[0]


def test_item9_stale_lock_of_a_reused_pid_is_taken_over(tmp_path):
    from negdpo.core.outdir import LOCK, OutputDirLockedError, _start_time, run_lock

    me = {"pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / LOCK).write_text(json.dumps({**me, "start": "1"}))  # our pid, another process's start time
    with records("negdpo.core.outdir") as logs, run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["start"] == _start_time(os.getpid())
    assert any("now belongs to another process" in r.getMessage() for r in logs)
    (tmp_path / LOCK).write_text(json.dumps({**me, "start": _start_time(os.getpid())}))  # really held
    with pytest.raises(OutputDirLockedError), run_lock(tmp_path):
        pass


def test_item9_adapter_without_its_reference_file_is_not_loaded_silently(tmp_path):
    from negdpo.generator.sample import _adapter_chain

    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (dpo / "README.md").write_text("LoRA ... Reference adapter: `../sft`.\n")
    with pytest.raises(FileNotFoundError, match=r"no negdpo_adapter.json, but it was trained on top of .*'\.\./sft'"):
        _adapter_chain(dpo)
    (dpo / "README.md").unlink()
    with records("negdpo.generator.sample") as logs:
        assert _adapter_chain(dpo) == [dpo]
    assert any("no negdpo_adapter.json; loading it on the base model alone" in r.getMessage() for r in logs)
    ckpt = tmp_path / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text("reference_adapter: outputs/sft\n")
    with pytest.raises(FileNotFoundError, match="outputs/sft"):
        _adapter_chain(ckpt)


def test_item9_clip_fp16_on_cpu_says_it_trains_in_fp32(phantom_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from negdpo.preference.clip.train import ClipTrainConfig, train

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with records("negdpo.preference.clip.train") as logs:
            train(ClipTrainConfig(dataset_name=str(phantom_dir), output_dir=str(tmp_path / "r"), max_train_steps=1,
                                  mixed_precision="fp16", save_final=False, **CLIP_FAST))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState()
    said = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    assert any("fp16 has no effect on the CPU" in s and "trains in fp32" in s for s in said)
