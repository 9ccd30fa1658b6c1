"""Launch honesty (core/launch.py): a launch that gives fewer processes than asked says so; the guard against
N lone processes on one folder prints one line on rank 0 and exits 2 on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from negdpo.core.launch import LaunchError, check_launch, env_rank, launch_warning, requested_processes

ROOT = Path(__file__).resolve().parents[1]
ACCEL = ["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "accelerate_configs/cpu.yaml"]


@pytest.mark.parametrize(("argv", "n"), [
    (ACCEL + ["--num_processes", "2", "gen_train.py"], 2),
    (ACCEL + ["--num-processes=4", "gen_train.py", "--max_train_steps", "3"], 4),
    (["/usr/bin/python3", "-m", "accelerate.commands.launch", "--num_processes", "3", "x.py"], 3),
    (ACCEL + ["gen_train.py"], None),  # the count comes from the config
    (["/usr/bin/python3", "train.py", "--num_processes", "2"], None),  # not accelerate's command line
    (None, None),
])
def test_requested_processes_reads_accelerate_command_lines(argv, n):
    assert requested_processes(argv) == n


def test_warning_when_the_run_has_fewer_processes_than_asked():
    msg = launch_warning({}, 1, ACCEL + ["--num_processes", "2", "gen_train.py"])
    assert msg and "asked for 2 processes but this run has 1" in msg and "torchrun" in msg
    assert launch_warning({}, 2, ACCEL + ["--num_processes", "2", "gen_train.py"]) is None  # got what it asked
    assert launch_warning({}, 1, ACCEL + ["gen_train.py"]) is None
    # Accelerate's simple launcher sets MASTER_ADDR only when asked for N > 1 (count from the config file)
    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "asked for several processes but this run has 1" in launch_warning(simple, 1, None)
    assert launch_warning(simple | {"WORLD_SIZE": "2"}, 2, None) is None  # torchrun: a real group
    assert launch_warning({"MASTER_ADDR": "10.0.0.1"}, 1, None) is None  # a cluster variable alone says nothing


def test_check_launch_warns_once_on_the_main_process(monkeypatch):
    from negdpo.core import launch

    said: list[str] = []
    monkeypatch.setattr(launch.logger, "warning", said.append)
    argv = ACCEL + ["--num_processes", "2", "gen_train.py"]
    check_launch(SimpleNamespace(num_processes=1, is_main_process=True), env={}, argv=argv)
    check_launch(SimpleNamespace(num_processes=1, is_main_process=False), env={}, argv=argv)
    check_launch(SimpleNamespace(num_processes=1, is_main_process=True), env={}, argv=ACCEL + ["gen_train.py"])
    assert len(said) == 1 and said[0].startswith("accelerate launch was asked for 2 processes")


def test_lone_ranks_stop_rank_zero_says_why():
    one = SimpleNamespace(num_processes=1, is_main_process=True)
    assert env_rank({"RANK": "3", "LOCAL_RANK": "1"}) == 3 and env_rank({"LOCAL_RANK": "1"}) == 1
    assert env_rank({}) == 0
    with pytest.raises(LaunchError, match="started 2 processes but each runs alone"):
        check_launch(one, env={"WORLD_SIZE": "2", "RANK": "0"}, argv=[])
    with pytest.raises(SystemExit) as stop:
        check_launch(one, env={"WORLD_SIZE": "2", "RANK": "1"}, argv=[])
    assert stop.value.code == 2
    check_launch(SimpleNamespace(num_processes=2, is_main_process=True), env={"WORLD_SIZE": "2"}, argv=[])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_lone_ranks_through_a_command_one_line_and_exit_2_on_every_rank(tmp_path):
    """Two ranks of gen_train with the variables torchrun sets, on a machine without GPUs: Accelerate forms a
    group but reports one process per rank (what ``accelerate_configs/multi_gpu.yaml`` gives on a CPU)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, HF_HUB_OFFLINE="1")
        env.pop("ACCELERATE_USE_CPU", None)
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "gen_train.py"), "--output_dir", str(tmp_path / "run"), "--max_train_steps",
             "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (out0, err0), (out1, err1) = (p.communicate(timeout=600) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    lines = [line for line in err0.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gen_train: error: the launcher started 2 processes"), lines
    assert err1.strip() == "" and out0 == out1 == ""
    assert not (tmp_path / "run").exists()  # nothing claimed before the check


@pytest.mark.integration
def test_accelerate_launch_on_cpu_warns_that_it_started_one_process(tmp_path):
    """The real launcher: ``accelerate launch --config_file cpu.yaml --num_processes 2`` runs one process."""
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom accelerate import Accelerator\nfrom negdpo.core.console import run_main\n"
                     "from negdpo.core.launch import check_launch\n"
                     "sys.exit(run_main('probe', lambda argv: check_launch(Accelerator())))\n")
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", str(probe)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in out.stderr.splitlines() if "accelerate launch was asked for" in line]
    assert len(warned) == 1 and "asked for 2 processes but this run has 1" in warned[0], out.stderr[-2000:]
