"""The fault probe's findings (issue 25), items 1-5, each test failing on the code before its fix.

1 NaN-stop advice works (a new --learning_rate replaces the checkpoint's); 2 torn metrics.jsonl; 3 build-pairs
folder lock and process group; 4 stable adapter hash; 5 a failed start frees the folder. Items 6-9:
test_fault_probe_inputs.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fault_probe_common import (
    BUILD,
    CLIP_FAST,
    clip_args,
    fresh_console,
    one_error_line,
    records,
    steps,
)


@pytest.fixture(autouse=True)
def _fresh_console():
    with fresh_console():
        yield


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


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
    lrs = {r["step"]: r["lr"] for r in steps(out / "metrics.jsonl")}
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
    assert steps(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 3, "loss": 0.125}]


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
def test_item3_second_build_into_a_folder_in_use_is_refused(phantom_dir, tmp_path, live_pid, capsys):
    """Two builds into one folder both did all the work and raced in the merge; now the second is refused."""
    from negdpo.core.outdir import _start_time
    from negdpo.preference.pairs.build_cli import main

    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": live_pid, "host": socket.gethostname(), "start": _start_time(live_pid)}
    (out / ".negdpo.lock").write_text(json.dumps(lock))
    assert main(["--data", str(phantom_dir), "--out", str(out), *BUILD]) == 2
    line = one_error_line(capsys.readouterr().err, "negdpo build-pairs")
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
    assert main(clip_args(empty, out, max_train_steps=1, save_final=False)) == 2
    line = one_error_line(capsys.readouterr().err, "clip_train")
    assert str(empty) in line
    assert not out.exists() or not any(out.iterdir())
    assert main(clip_args(phantom_dir, out, max_train_steps=1, save_final=False)) == 0
    assert [r["step"] for r in steps(out / "metrics.jsonl")] == [1]


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
        assert str(bad) in one_error_line(capsys.readouterr().err, "gen_train")
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
