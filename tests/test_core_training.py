"""Shared training scaffolding: launcher precision, output-folder claims, resume rules, non-finite stops."""

from __future__ import annotations

import math

import pytest
import torch
from negdpo.core.checkpoints import list_checkpoints
from negdpo.core.outdir import OutputDirError
from negdpo.core.training import NonFiniteError, TrainConfig, finish_run, resume_path, start_run


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState()


@pytest.mark.parametrize(("env", "cfg_value", "expected"), [("bf16", None, "bf16"), ("bf16", "no", "no"),
                                                             (None, None, "no")])
def test_launcher_mixed_precision_is_honoured(tmp_path, monkeypatch, fresh_accelerate_state, env, cfg_value, expected):
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    run = start_run(TrainConfig(output_dir=str(tmp_path / "r"), report_to="none", mixed_precision=cfg_value), "x")
    try:
        assert run.accelerator.mixed_precision == expected
    finally:
        finish_run(run)


def test_output_folder_is_claimed_and_locked(tmp_path, fresh_accelerate_state):
    out = tmp_path / "r"
    cfg = TrainConfig(output_dir=str(out), report_to="none")
    run = start_run(cfg, "x")
    assert (out / "config.yaml").is_file() and (out / ".negdpo.lock").is_file()
    with pytest.raises(OutputDirError, match="in use by another run"):
        start_run(cfg, "x")
    finish_run(run)
    assert not (out / ".negdpo.lock").exists()
    with pytest.raises(OutputDirError, match="--overwrite_output_dir"):  # a finished run is not silently mixed
        start_run(cfg, "x")
    (out / "stale.txt").write_text("old run")
    finish_run(start_run(TrainConfig(output_dir=str(out), report_to="none", overwrite_output_dir=True), "x"))
    assert not (out / "stale.txt").exists()
    finish_run(start_run(TrainConfig(output_dir=str(out), report_to="none", resume_from_checkpoint="latest"), "x"))


def test_resume_rules(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert resume_path("latest", tmp_path) is None  # nothing to resume: warn, start fresh (diffusers)
    assert "starting a new run" in caplog.text
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resume_path(str(tmp_path / "checkpoint-7"), tmp_path)
    assert resume_path(None, tmp_path) is None


def test_clip_train_stops_on_nan_and_keeps_finite_weights(phantom_dir, tmp_path):
    """Learning rate 1e6 used to write NaN weights and exit 0."""
    from negdpo.preference.clip.train import ClipTrainConfig, train

    out = tmp_path / "nan"
    cfg = ClipTrainConfig(dataset_name=str(phantom_dir), output_dir=str(out), loss="dpo+clip", learning_rate=1e6,
                          lr_scheduler="constant", train_batch_size=4, max_train_steps=6, report_to="none",
                          tsne=False, progress_bar=False, max_grad_norm=0.0)
    with pytest.raises(NonFiniteError, match=r"step \d+.*saved in .*checkpoint-\d+"):
        train(cfg)
    (ckpt,) = list_checkpoints(out, complete_only=True)
    from safetensors.torch import load_file

    state = load_file(next(ckpt.glob("model*.safetensors")))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (out / "final").exists()


def test_generator_stops_on_persistent_inf_gradients(phantom_dir, tmp_path):
    """beta 1e38: the gradient norm is inf every step; three skipped updates, then a stop (was: 'success')."""
    from negdpo.generator.train import GenTrainConfig, train

    out = tmp_path / "inf"
    cfg = GenTrainConfig(dataset_name=str(phantom_dir), output_dir=str(out), beta=1e38, train_batch_size=2,
                         max_train_steps=10, report_to="none", eval_pairs=0, validation_steps=0, sdpo=False,
                         cache_latents=True, max_nonfinite_grad_steps=3)
    with pytest.raises(NonFiniteError) as err:
        train(cfg)
    msg = str(err.value)
    assert "gradient norm non-finite on 3 consecutive steps" in msg or "loss became" in msg
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    (ckpt,) = list_checkpoints(out, complete_only=True)
    from safetensors.torch import load_file

    lora = load_file(ckpt / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    assert math.isfinite(sum(float(v.abs().sum()) for v in lora.values()))
