"""Training scaffolding shared by every trainer (generator, CLIP, prompt generator), as functions.

    cfg = parse_config(MyConfig)                     # MyConfig(TrainConfig): diffusers' example-script names
    run = start_run(cfg, kind="generator")           # Accelerator, output dir (+ lock), config, trackers, seed
    start = resume_step(run, cfg)                    # 'latest' = newest complete checkpoint, or 0
    metrics = MetricsLog(run, start)                 # metrics.jsonl (rank-reduced), no repeated steps
    guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
    ...  guard.check_loss(loss, step) / guard.grads_ok(grad_norm, step) / save_checkpoint(run, step, limit)
    finish_run(run)

* Mixed precision: ``None`` (default) honours ``accelerate launch --mixed_precision`` and the accelerate
  config file; a value in the run config wins.
* Resume: ``latest`` with nothing to resume from warns and starts fresh (as diffusers does); an explicit
  path that does not exist is an error.
* Checkpoints are atomic (:mod:`negdpo.core.checkpoints`); ``checkpoints_total_limit=None`` keeps all.
* A non-finite loss, or a non-finite gradient norm on ``max_nonfinite_grad_steps`` consecutive steps,
  stops the run after the last finite state was saved (:class:`NonFiniteError`, one line, exit code 3).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import (
    finalize_checkpoint,
    latest_checkpoint,
    partial_dir,
    prune_checkpoints,
    step_of,
)
from .config import (
    check,
    check_choice,
    check_finite_positive,
    check_positive,
    config_to_dict,
    default_output_dir,
    save_config,
    seed_everything,
    tracker_config,
)
from .faults import fault_point
from .launch import check_launch
from .metrics_log import METRICS_FILE, MetricsLog, append_line, read_metrics, reduce_metrics  # noqa: F401
from .outdir import LOCK, MARKER

logger = logging.getLogger(__name__)
REPORT_TO = ("tensorboard", "wandb", "all", "none")


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient norm; the last finite state was saved."""


@dataclass
class TrainConfig:
    """Fields every trainer shares, under the names of diffusers' example scripts."""

    output_dir: str = field(default="", metadata={"help": "default: $NEGDPO_OUTPUT/<kind>/<run_name> (outputs/...)"})
    run_name: str = field(
        default="run", metadata={"help": "run name: names the default output folder and the tracker run"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a previous run in output_dir"})
    seed: int = field(default=0, metadata={"help": "random seed (python, numpy, torch on every process)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (after warm-up)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    use_8bit_adam: bool = field(
        default=False, metadata={"help": "bitsandbytes 8-bit AdamW (needs a GPU and the gpu extra)"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "diffusers learning-rate schedule: constant | linear | cosine | constant_with_warmup | ..."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "optimizer steps of linear warm-up"})
    train_batch_size: int = field(default=4, metadata={"help": "examples per device and micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_train_steps: int = field(default=100, metadata={"help": "optimizer steps of the run"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no | fp16 | bf16 (default: the launcher's)"})
    checkpointing_steps: int = field(default=0, metadata={"help": "save a resumable state every N steps (0 = off)"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep the newest N (None = all)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | all | none"})
    tracker_name: str = field(default="", metadata={"help": "tracker project name (default negdpo-<kind>)"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N optimizer steps"})
    validation_steps: int = field(default=0, metadata={"help": "validate every N steps (0 = only at the end)"})
    max_nonfinite_grad_steps: int = field(default=3, metadata={"help": "stop after N consecutive inf/NaN grad norms"})
    torch_threads: int = field(default=0, metadata={"help": "intra-op CPU threads for this run (0 = leave as is)"})

    def __post_init__(self) -> None:
        check_positive(self, "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                       "logging_steps", "max_nonfinite_grad_steps")
        check_finite_positive(self, "learning_rate", "adam_epsilon")
        for key in ("lr_warmup_steps", "checkpointing_steps", "validation_steps", "torch_threads"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        check(self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm), "max_grad_norm", self.max_grad_norm,
              "must be a finite number >= 0")
        check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit",
              self.checkpoints_total_limit, "must be >= 1, or None to keep all")
        check_choice(self, "report_to", REPORT_TO)
        check_choice(self, "mixed_precision", (None, "no", "fp16", "bf16"))
        for key in ("adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            check(0.0 <= v < 1.0, key, v, "must be in [0, 1)")


@dataclass
class Run:
    """What :func:`start_run` set up: the accelerator, the output folder and the lock held on it."""

    accelerator: Any
    out: Path
    kind: str
    lock: contextlib.ExitStack
    fresh: bool = False  # the folder was new or empty when this run claimed it
    settings: dict[str, Any] = field(default_factory=dict)  # the resolved config, recorded in each checkpoint
    claimed: bool = False  # this process locked and prepared the folder

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)


def output_path(cfg: TrainConfig, kind: str) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else default_output_dir(kind, cfg.run_name)


def start_run(cfg: TrainConfig, kind: str, owner: str | None = None) -> Run:
    """Accelerator (+ trackers), output folder claimed and locked, resolved config saved, seeded."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .outdir import output_dir

    if cfg.torch_threads > 0:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    out = output_path(cfg, kind)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    check_launch(accelerator)
    fresh = not out.is_dir() or not any(p.name not in (MARKER, LOCK) for p in out.iterdir())
    run = Run(accelerator, out, kind, contextlib.ExitStack(), fresh, config_to_dict(cfg))
    started = _STARTED.get()
    if started is not None:  # from here on, a failure inside trainer_scope releases the claim
        started.append(run)
    if accelerator.is_main_process:
        run.lock.enter_context(output_dir(out, owner or kind, overwrite=cfg.overwrite_output_dir,
                                          resume=bool(cfg.resume_from_checkpoint)))
        run.claimed = True
        save_config(cfg, out)
    accelerator.wait_for_everyone()
    seed_everything(cfg.seed)
    if accelerator.is_main_process and log_with:
        accelerator.init_trackers(cfg.tracker_name or f"negdpo-{kind}", config=tracker_config(cfg))
    return run


_STARTED: contextvars.ContextVar[list[Run] | None] = contextvars.ContextVar("negdpo_started_runs", default=None)


@contextlib.contextmanager
def trainer_scope() -> Iterator[None]:
    """Wrap a trainer: when it fails, every run it started releases its lock, and a folder that was new and
    holds no training yet (no checkpoint, no metrics) is released as well, so the corrected command can use
    it; a full disk is re-raised as ``OSError(ENOSPC)`` naming the run's folder."""
    runs: list[Run] = []
    token = _STARTED.set(runs)
    try:
        yield
    except BaseException as err:
        for run in runs:
            release_run(run)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC and runs:
            what = f" (writing {err.filename})" if err.filename else ""
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + what, str(runs[-1].out)) from err
        raise
    finally:
        _STARTED.reset(token)


def _trained(out: Path) -> bool:
    return (out / METRICS_FILE).exists() or any(out.glob("checkpoint-*")) or any(out.glob(".checkpoint-*"))


def release_run(run: Run) -> None:
    """Release a failed run's lock; a folder it found new or empty and left untrained is emptied again."""
    import shutil

    try:
        if run.claimed and run.fresh and run.out.is_dir() and not _trained(run.out):
            for p in run.out.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            logger.info("%s: nothing was trained; the folder is free again", run.out)
    except OSError as err:  # never hide the error that brought us here
        logger.warning("%s: could not release the folder (%s)", run.out, err)
    finally:
        run.lock.close()


def resume_path(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` -> newest complete (None if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        path = latest_checkpoint(out)
        if path is None:
            logger.warning("resume_from_checkpoint=latest: no complete checkpoint in %s; starting a new run", out)
        return path
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return path


def resume_step(run: Run, cfg: TrainConfig) -> int:
    """Load the state to resume from (Accelerate ``load_state``) and return its step (0 for a new run)."""
    path = resume_path(cfg.resume_from_checkpoint, run.out)
    if path is None:
        return 0
    run.accelerator.print(f"resuming from {path}")
    try:
        run.accelerator.load_state(str(path))
    except (RuntimeError, ValueError, KeyError) as err:  # shapes/keys of another model or optimizer
        raise ResumeMismatchError(_mismatch_message(path, run.settings, err)) from err
    apply_learning_rate(run, cfg.learning_rate)
    return step_of(path)


class ResumeMismatchError(ValueError):
    """The checkpoint holds another model or optimizer than this run's settings build."""


# settings that steer a run but do not shape the state a checkpoint holds
RUN_CONTROL = {"output_dir", "run_name", "overwrite_output_dir", "resume_from_checkpoint", "max_train_steps",
               "checkpointing_steps", "checkpoints_total_limit", "report_to", "tracker_name", "logging_steps",
               "validation_steps", "torch_threads", "learning_rate", "code_version"}


def _mismatch_message(path: Path, settings: dict[str, Any], err: BaseException) -> str:
    from .checkpoints import MARKER as CHECKPOINT_MARKER

    try:
        saved = json.loads((path / CHECKPOINT_MARKER).read_text()).get("config") or {}
    except (OSError, ValueError):
        saved = {}
    diff = [f"--{k} {saved[k]} -> {settings[k]}" for k in sorted(set(saved) & set(settings))
            if k not in RUN_CONTROL and saved[k] != settings[k]]
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    what = (f"it was saved with {'; '.join(diff[:6])}" if diff
            else f"it does not fit this run's model or optimizer ({first})")
    return (f"cannot resume from {path}: {what}; resume with the checkpoint's settings, or start a new run in "
            "another --output_dir")


def apply_learning_rate(run: Run, learning_rate: float) -> None:
    """After ``load_state``: a config learning rate other than the checkpoint's replaces it.

    ``load_state`` restores the optimizer's and the scheduler's base learning rates, so a resume with a
    lower ``--learning_rate`` (the NaN stop's advice) would otherwise rerun the old one. Every scheduler
    here is a ``LambdaLR`` (lr = base lr x factor(step)), so scaling the base lrs, ``initial_lr`` and the
    current lr of each group by new/old keeps the schedule's position and per-group ratios.
    """
    schedulers = [getattr(s, "scheduler", s) for s in getattr(run.accelerator, "_schedulers", [])]
    optimizers = [getattr(o, "optimizer", o) for o in getattr(run.accelerator, "_optimizers", [])]
    old = next((float(s.base_lrs[0]) for s in schedulers if getattr(s, "base_lrs", None)), None)
    if old is None and optimizers and optimizers[0].param_groups:
        group = optimizers[0].param_groups[0]
        old = float(group.get("initial_lr", group["lr"]))
    if old is None or old <= 0 or math.isclose(old, learning_rate, rel_tol=1e-12, abs_tol=0.0):
        return
    ratio = learning_rate / old
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * ratio
    for sched in schedulers:
        if getattr(sched, "base_lrs", None):
            sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
        if getattr(sched, "_last_lr", None):
            sched._last_lr = [lr * ratio for lr in sched._last_lr]
    if getattr(run.accelerator, "is_main_process", True):
        logger.warning("resume: learning_rate %g (checkpoint) -> %g (this run's config), applied to the optimizer "
                       "and the scheduler", old, learning_rate)


def save_checkpoint(run: Run, step: int, limit: int | None) -> Path:
    """Atomic ``checkpoint-<step>`` (every process saves, the main one finalises), then prune to ``limit``."""
    import shutil

    acc = run.accelerator
    tmp = partial_dir(run.out, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    fault_point("checkpoint_save", step)
    final = run.out / f"checkpoint-{step}"
    if acc.is_main_process:
        finalize_checkpoint(run.out, step, {"kind": run.kind, "config": run.settings})
        fault_point("checkpoint_prune", step)
        prune_checkpoints(run.out, limit)
    acc.wait_for_everyone()
    return final


class NonFiniteGuard:
    """Stops on a non-finite loss (at once) or ``patience`` consecutive non-finite gradient norms."""

    def __init__(self, patience: int = 3) -> None:
        self.patience, self.bad_grads = patience, 0

    def loss_ok(self, accelerator: Any, loss: Any) -> bool:
        """True when the loss is finite on every process."""
        import torch

        flag = torch.isfinite(loss.detach().float()).all().reshape(1).to(torch.float32)
        return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes) \
            if accelerator.num_processes > 1 else bool(flag.item())

    def grads_ok(self, grad_norm: Any) -> bool:
        """True for a finite norm (resets the count); False means: skip this optimizer step."""
        value = float(grad_norm)
        if math.isfinite(value):
            self.bad_grads = 0
            return True
        self.bad_grads += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.bad_grads >= self.patience


def stop_nonfinite(run: Run, step: int, what: str, limit: int | None) -> NonFiniteError:
    """Save the current (finite) state as ``checkpoint-<step>`` and build the one-line error to raise."""
    ckpt = save_checkpoint(run, step, None if limit is None else max(limit, 1))
    return NonFiniteError(f"{what} at step {step + 1}; the finite state of step {step} is saved in {ckpt}. "
                          f"Rerun with a lower --learning_rate (it replaces the checkpoint's; or a lower --beta, or fp32/bf16) "
                          f"and --resume_from_checkpoint {ckpt}")


def update(run: Run, loss: Any, params: Any, optimizer: Any, scheduler: Any, guard: NonFiniteGuard,
           cfg: TrainConfig, step: int) -> float | None:
    """One micro-step inside ``accelerator.accumulate``: stop on a non-finite loss, backward, and at a sync step
    clip (returning the norm before clipping) and skip an update whose gradient norm is inf/NaN — stopping after
    ``guard.patience`` such steps in a row. Every trainer calls this; the stops raise :class:`NonFiniteError`."""
    acc = run.accelerator
    if not guard.loss_ok(acc, loss):
        raise stop_nonfinite(run, step, f"loss became {float(loss.detach())}", cfg.checkpoints_total_limit)
    acc.backward(loss)
    grad_norm = None
    if acc.sync_gradients:
        grad_norm = float(clip_gradients(acc, params, cfg.max_grad_norm))
        if not guard.grads_ok(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # inf/NaN gradients would poison the weights
            if guard.exhausted:
                raise stop_nonfinite(run, step, f"gradient norm non-finite on {guard.bad_grads} consecutive steps",
                                     cfg.checkpoints_total_limit)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def clip_gradients(accelerator: Any, params: Any, max_norm: float) -> Any:
    """Clip to ``max_norm`` (0 = no clipping) and return the total norm before clipping."""
    return accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def make_optimizer(params: Any, cfg: TrainConfig, weight_decay: float | None = None) -> Any:
    """AdamW (8-bit from bitsandbytes when asked and installed)."""
    import torch

    cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        except ImportError:
            logger.warning("bitsandbytes not installed; using torch.optim.AdamW")
    wd = cfg.adam_weight_decay if weight_decay is None else weight_decay
    return cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=wd,
               eps=cfg.adam_epsilon)


def make_scheduler(optimizer: Any, cfg: TrainConfig, num_processes: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                         num_training_steps=cfg.max_train_steps * num_processes)


def step_seed(seed: int, step: int, micro: int = 0, rank: int = 0) -> int:
    """Seed of one micro-step: data order, noise and dropout depend on (seed, step) only, so resume is exact."""
    from .config import derive_seed

    return derive_seed("step", step, micro, rank, base=seed)


def epoch_batches(n: int, batch: int, flat_step: int, seed: int, world: int = 1, rank: int = 0) -> list[int]:
    """Indices of micro-batch ``flat_step`` for ``rank``: shuffled epochs (drop last), a pure function of its inputs."""
    import torch

    from .config import derive_seed

    global_batch = batch * world
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n} training examples < train_batch_size x processes = {global_batch}")
    epoch, pos = divmod(flat_step, per_epoch)
    gen = torch.Generator().manual_seed(derive_seed("epoch", epoch, base=seed))
    perm = torch.randperm(n, generator=gen)[pos * global_batch:(pos + 1) * global_batch]
    return perm[rank * batch:(rank + 1) * batch].tolist()


def finish_run(run: Run) -> None:
    run.accelerator.end_training()
    run.lock.close()
