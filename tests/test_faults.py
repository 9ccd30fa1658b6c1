"""Fault injection with real processes: kill -9 at chosen points, resume, and get the uninterrupted result.

Each trainer is killed five times in a row at different points (after a step, inside a checkpoint save,
between a checkpoint's completion and pruning, after a log line, before the final save); every kill is
followed by the same command with ``--resume_from_checkpoint latest``. The final artefacts must equal an
uninterrupted run's, no partial checkpoint may ever be taken as valid, and the log holds each step once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from negdpo.core.checkpoints import MARKER, list_checkpoints
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
KILLS = ["step_end:2", "checkpoint_save:3", "checkpoint_prune:4", "after_log:5", "final:6"]


def _run(script: str, args: list[str], fault: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("NEGDPO_FAULT", None)
    if fault:
        env["NEGDPO_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / script), *args, "--torch_threads", "1"], env=env,
                          capture_output=True, text=True, timeout=600)


def _kill_chain(script: str, args: list[str], out: Path) -> None:
    for fault in KILLS:
        res = _run(script, args, fault)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stderr[-2000:])
        for ckpt in list_checkpoints(out):  # whatever a kill left behind, no visible checkpoint is partial
            assert (ckpt / MARKER).is_file(), (fault, ckpt)
    res = _run(script, args, None)
    assert res.returncode == 0, res.stderr[-3000:]


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _yaml(path: Path, settings: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.mark.integration
def test_gen_train_survives_kills(phantom_dir, tmp_path):
    from negdpo.core.config import parse_config
    from negdpo.generator.train import GenTrainConfig, train

    cfg_file = _yaml(tmp_path / "gen.yaml", dict(
        dataset_name=str(phantom_dir), train_batch_size=2, max_train_steps=6, checkpointing_steps=1,
        checkpoints_total_limit=2, report_to="none", eval_pairs=0, validation_steps=0, cache_latents=True,
        mi_weight=0.1, fidelity_weight=0.01, learning_rate=1e-3, resume_from_checkpoint="latest"))
    train(parse_config(GenTrainConfig, ["--config", cfg_file, "--output_dir", str(tmp_path / "full")]))
    out = tmp_path / "killed"
    _kill_chain("gen_train.py", ["--config", cfg_file, "--output_dir", str(out)], out)
    _assert_same_tensors(load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors"),
                         load_file(out / "pytorch_lora_weights.safetensors"))
    full, killed = _steps(tmp_path / "full" / "metrics.jsonl"), _steps(out / "metrics.jsonl")
    assert [r["step"] for r in killed] == list(range(1, 7))
    assert [r["loss"] for r in killed] == [r["loss"] for r in full]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


@pytest.mark.integration
def test_clip_train_survives_kills(phantom_dir, tmp_path):
    from negdpo.core.config import parse_config
    from negdpo.preference.clip.train import ClipTrainConfig, train

    cfg_file = _yaml(tmp_path / "clip.yaml", dict(
        dataset_name=str(phantom_dir), loss="dpo+clip", train_batch_size=4, eval_batch_size=8, max_train_steps=6,
        checkpointing_steps=1, checkpoints_total_limit=2, report_to="none", logging_steps=1, learning_rate=1e-3,
        lr_scheduler="constant", tsne=False, progress_bar=False, resume_from_checkpoint="latest"))
    train(parse_config(ClipTrainConfig, ["--config", cfg_file, "--output_dir", str(tmp_path / "full")]))
    out = tmp_path / "killed"
    _kill_chain("clip_train.py", ["--config", cfg_file, "--output_dir", str(out)], out)
    _assert_same_tensors(load_file(tmp_path / "full" / "final" / "open_clip_model.safetensors"),
                         load_file(out / "final" / "open_clip_model.safetensors"))
    full, killed = _steps(tmp_path / "full" / "metrics.jsonl"), _steps(out / "metrics.jsonl")
    assert [r["step"] for r in killed] == list(range(1, 7))
    assert [r["loss"] for r in killed] == [r["loss"] for r in full]
