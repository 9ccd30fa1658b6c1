"""Teach a Qwen2-VL-class model to write phantom reports (image -> report text), so that its attention
means something on phantoms before VL-SAM reads it (``docs/method.md#vl-sam``).

Teacher forcing: the user turn is the image and ``question``; the assistant turn is the scan's report
(the folder's ``prompts.json`` text, e.g. "A T1-weighted axial brain MRI showing a small bright tumour
in the left frontal lobe."); cross-entropy on the report tokens and the end-of-turn token only.
Scaffolding (Accelerate, output folder, metrics, checkpoints) is ``negdpo.core.training``.

    python -m negdpo.segmentation.vlm_train --config configs/vlm_demo.yaml
    negdpo evaluate --data <phantoms> --saliency vlsam --vlm <output_dir>/vlm --out /tmp/eval

The trained model and processor are written to ``<output_dir>/vlm`` (``save_pretrained``, safetensors).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from negdpo.core.config import check, check_positive
from negdpo.core.training import (
    MetricsLog,
    NonFiniteGuard,
    TrainConfig,
    epoch_batches,
    finish_run,
    make_optimizer,
    make_scheduler,
    resume_step,
    save_checkpoint,
    start_run,
    step_seed,
    update,
)
from negdpo.core.window import ScanReading

from .saliency.vlsam import DEFAULT_QUESTION, chat_inputs

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class VlmTrainConfig(TrainConfig, ScanReading):
    """Report-generation fine-tuning of a VLM on a scan folder with ``prompts.json``."""

    model: str = field(
        default="tiny", metadata={"help": "VLM to fine-tune: tiny | a Qwen2-VL hub id | a folder"})
    data: str = field(
        default="", metadata={"help": "scan folder with prompts.json (the reports); empty = phantoms generated next to the output folder"})
    split: str = field(default="train", metadata={"help": "split the reports are trained on"})
    eval_split: str = field(
        default="val", metadata={"help": "held-out split of the before/after report evaluation"})
    question: str = field(
        default=DEFAULT_QUESTION, metadata={"help": "the question the VLM answers with the scan's report"})
    phantoms_n: int = field(default=24, metadata={"help": "without data: phantom subjects to generate"})
    phantoms_size: int = field(default=64, metadata={"help": "without data: phantom image side in px"})
    phantoms_seed: int = field(default=0, metadata={"help": "without data: seed of the phantoms"})
    run_name: str = "vlm_reports"
    learning_rate: float = 2e-3
    train_batch_size: int = 8
    max_train_steps: int = 200
    report_to: str = "none"
    logging_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        ScanReading.__post_init__(self)
        check_positive(self, "phantoms_n", "phantoms_size")
        check(bool(self.question.strip()), "question", self.question, "must not be empty")


def _data_dir(cfg: VlmTrainConfig, out: Path) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from negdpo.core.phantoms import ensure_phantoms

    return ensure_phantoms(out.parent / f"phantoms_n{cfg.phantoms_n}_s{cfg.phantoms_size}_seed{cfg.phantoms_seed}",
                           n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.phantoms_seed, slices=2, preview=False)


def encode_example(processor, image, question: str, report: str) -> dict[str, torch.Tensor]:
    """One teacher-forced example: the chat (image, question, report) with labels on the report + end token."""
    prompt = chat_inputs(processor, image, question, "cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": report}]
    text = processor.apply_chat_template(messages, tokenize=False)
    from negdpo.core.imageio import to_rgb_uint8
    from PIL import Image

    full = processor(images=[Image.fromarray(to_rgb_uint8(image))], text=[text], return_tensors="pt")
    ids = full["input_ids"][0]
    n_prompt = prompt["input_ids"].shape[1]
    if not torch.equal(ids[:n_prompt], prompt["input_ids"][0]):
        raise ValueError("the chat template's generation prompt is not a prefix of the full chat")
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    eos = processor.tokenizer.eos_token_id
    ends = (ids == eos).nonzero()[:, 0]
    ends = ends[ends >= n_prompt]
    if len(ends):
        labels[int(ends[0]) + 1:] = IGNORE  # nothing after the assistant's end-of-turn
    example = {k: v[0] for k, v in full.items() if k not in ("pixel_values",)}
    example.update(pixel_values=full["pixel_values"], labels=labels)
    return example


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the token rows; concatenate the flattened patches (Qwen2-VL's layout)."""
    n = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.cat([e[key], torch.full((n - len(e[key]),), value, dtype=e[key].dtype)])
                            for e in examples])

    batch = {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
             "labels": pad("labels", IGNORE), "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
             "image_grid_thw": torch.stack([e["image_grid_thw"] for e in examples]).reshape(-1, 3)}
    if "mm_token_type_ids" in examples[0]:
        batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
    return batch


def load_examples(processor, data: Path, split: str, question: str,
                  reading: dict | None = None) -> list[dict[str, torch.Tensor]]:
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(data, **(reading or {}))  # reading: ScanReading.reading()
    prompts = folder.prompts
    scans = folder.load_split(split)
    missing = [s.name for s in scans if s.name not in prompts]
    if missing:
        raise ValueError(f"{data}/prompts.json has no report for {len(missing)} '{split}' images, e.g. {missing[0]}")
    return [encode_example(processor, s.image, question, prompts[s.name]) for s in scans]


@torch.no_grad()
def mean_loss(model, examples: list[dict[str, torch.Tensor]], pad_id: int, device, batch_size: int = 8) -> float:
    """Token-weighted teacher-forced cross-entropy over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def save_model(model, processor, target: Path) -> Path:
    """``save_pretrained`` (model + processor) into ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def train_vlm(cfg: VlmTrainConfig) -> dict[str, Any]:
    """Run the fine-tuning; returns {out, vlm (the saved folder), losses, eval_loss_before/after}."""
    from negdpo.core.models.vlm import load_vlm, resolve_vlm

    if cfg.data and not Path(cfg.data).is_dir():  # inputs before the output folder is claimed or a model loads
        raise FileNotFoundError(f"--data {cfg.data}: scan folder does not exist")
    resolve_vlm(cfg.model)
    run = start_run(cfg, kind="vlm")
    acc = run.accelerator
    try:
        data = _data_dir(cfg, run.out)
        model, processor = load_vlm(cfg.model, "cpu")
        pad_id = processor.tokenizer.pad_token_id
        train = load_examples(processor, data, cfg.split, cfg.question, cfg.reading())
        held = load_examples(processor, data, cfg.eval_split, cfg.question, cfg.reading()) if cfg.eval_split else []
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
        optimizer = make_optimizer(params, cfg)
        scheduler = make_scheduler(optimizer, cfg, acc.num_processes)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        start = resume_step(run, cfg)
        metrics = MetricsLog(run, start)
        before = mean_loss(model, held, pad_id, acc.device) if held else math.nan
        losses: list[float] = []
        for step in range(start, cfg.max_train_steps):
            torch.manual_seed(step_seed(cfg.seed, step, rank=acc.process_index))
            idx = epoch_batches(len(train), cfg.train_batch_size, step, cfg.seed, acc.num_processes, acc.process_index)
            batch = {k: v.to(acc.device) for k, v in collate([train[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss
            grad_norm = update(run, loss, params, optimizer, scheduler, guard, cfg, step)
            losses.append(float(loss.detach()))
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_train_steps:
                metrics.log(step + 1, {"loss": losses[-1], "grad_norm": float(grad_norm or 0.0),
                                       "lr": scheduler.get_last_lr()[0]})
            if cfg.checkpointing_steps and (step + 1) % cfg.checkpointing_steps == 0:
                save_checkpoint(run, step + 1, cfg.checkpoints_total_limit)
        after = mean_loss(model, held, pad_id, acc.device) if held else math.nan
        metrics.log(cfg.max_train_steps, {"eval_loss_before": before, "eval_loss": after}, to_trackers=False)
        target = run.out / "vlm"
        if acc.is_main_process:
            save_model(acc.unwrap_model(model), processor, target)
        acc.wait_for_everyone()
        return {"out": run.out, "vlm": target, "losses": losses, "eval_loss_before": before, "eval_loss": after}
    finally:
        finish_run(run)


def _run(argv: list[str]) -> int:
    from negdpo.core.config import parse_config

    result = train_vlm(parse_config(VlmTrainConfig, argv))
    print(f"held-out report loss {result['eval_loss_before']:.3f} -> {result['eval_loss']:.3f}; "
          f"model in {result['vlm']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (bad flag or value, missing data or model): one line and exit 2."""
    from negdpo.core.console import run_main

    return run_main("negdpo train-vlm", _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
