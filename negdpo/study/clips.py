"""The study's CLIP stages: the base CLIPs (contrastive pre-training, one per seed) and the fine-tunes of each
seed's base; every run is a picklable stage body so independent runs can go to worker processes."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from negdpo.study.cache import Job, StudyRun
from negdpo.study.variants import FINETUNED

Checkpoints = dict[tuple[str, str], str]  # {(variant, tag): CLIP final/ folder}; tag: see :func:`run_tag`
FINETUNE_SEED_STRIDE = 1000  # fine-tune seed j of base seed s: s + 1000 j (j = 0: s, the seed before fine-tune seeds)


def train_clip(cfg: Any, out: Path, model: str, data: str, loss: str, steps: int, lr: float, seed: int,
               **overrides) -> dict:
    """One CLIP training run (:func:`negdpo.preference.clip.train.train`) into ``out``."""
    from negdpo.preference.clip.train import ClipTrainConfig, train

    base = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), run_name=out.name,
                loss=loss, seed=seed, max_train_steps=steps, learning_rate=lr, train_batch_size=cfg.clip_batch,
                report_to="tensorboard", resume_from_checkpoint="latest", progress_bar=True, validation_steps=0,
                checkpointing_steps=0)
    base.update(overrides)
    base.update(cfg.clip_extra)  # the user's extras win (e.g. tsne: false for a quick run)
    summary = train(ClipTrainConfig(**base))
    return {"checkpoint": str(summary.get("checkpoint", out / "final")),
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}}


def clip_job(cfg: Any, model: str, data: str, loss: str, steps: int, lr: float, seed: int, overrides: dict,
             out: Path) -> dict:
    """:func:`train_clip` with the stage folder last: ``functools.partial(clip_job, ...)`` is a picklable stage body."""
    return train_clip(cfg, out, model, data, loss, steps, lr, seed, **overrides)


def clip_seeds(cfg: Any) -> list[int]:
    """The CLIP seeds: ``seed``, ``seed + 1``, ... (``clip_seeds`` of them)."""
    return [cfg.seed + k for k in range(cfg.clip_seeds)]


def finetune_seeds(cfg: Any, base_seed: int) -> list[int]:
    """The fine-tune seeds of one base seed: ``s``, ``s + 1000``, ... (``clip_finetune_seeds`` of them)."""
    return [base_seed + FINETUNE_SEED_STRIDE * j for j in range(cfg.clip_finetune_seeds)]


def run_tag(base_seed: int, finetune_seed: int | None = None) -> str:
    """A checkpoint's tag in stage names (``clip_<variant>_s<tag>``) and checkpoint names (``<variant>.s<tag>``):
    ``"<s>"`` for a base and for a fine-tune with the base's own seed (the names before fine-tune seeds, so
    cached stages stay valid), ``"<s>f<ft>"`` otherwise."""
    return str(base_seed) if finetune_seed in (None, base_seed) else f"{base_seed}f{finetune_seed}"


def run_key(variant: str, tag: str) -> str:
    """The training run of a checkpoint, the unit of the statistics: ``"<base seed>/<fine-tune seed>"`` for a
    fine-tune, ``"<seed>"`` for a base CLIP (and rows trained from one seed's chain)."""
    base, _, ft = tag.partition("f")
    return f"{base}/{ft or base}" if variant in FINETUNED else base


def pretrain_split(cfg: Any) -> str:
    """Where the base CLIP (and the VLM) pre-train: the disjoint pool if there is one, else train."""
    return "pretrain" if cfg.phantoms_pretrain_n > 0 else "train"


def base_clips(run: StudyRun) -> Checkpoints:
    """Stages ``clip_base_s<seed>``: contrastive pre-training of one base CLIP per seed (read back where
    :func:`base_clip_jobs` already ran in the background)."""
    seeds = clip_seeds(run.cfg)
    return {("base", run_tag(sd)): job["checkpoint"] for sd, job in zip(seeds, run.stages(base_clip_jobs(run)))}


def base_clip_jobs(run: StudyRun) -> list[Job]:
    """The stages ``clip_base_s<seed>`` as picklable jobs: they depend on the phantoms only."""
    cfg, split = run.cfg, pretrain_split(run.cfg)
    settings = {"phantoms": run.ph_settings, "model": cfg.clip_model, "batch": cfg.clip_batch, "extra": cfg.clip_extra,
                "steps": cfg.clip_pretrain_steps, "lr": cfg.clip_pretrain_lr, "split": split}
    seeds = clip_seeds(cfg)
    jobs = [(f"clip_base_s{sd}", settings | {"seed": sd}, partial(
        clip_job, cfg, cfg.clip_model, str(run.phantoms), "clip", cfg.clip_pretrain_steps, cfg.clip_pretrain_lr, sd,
        dict(retention_weight=1.0, dedup_captions=True, freeze_logit_scale=False, tsne=False,
             train_split=split))) for sd in seeds]
    return jobs


def finetune_clips(run: StudyRun, clip_variants: list[str], base: Checkpoints,
                   data: dict[str, tuple[str, str, str]], pairs_settings: dict) -> Checkpoints:
    """Stages ``clip_<variant>_s<seed>``: each fine-tune of each seed's base.

    ``data``: {variant: (training set folder, loss, source)}, source = phantoms | pairs | harmonic | faithful |
    twinfree
    (what the stage key names besides the folder). Each base seed ``s`` gets ``clip_finetune_seeds`` fine-tunes
    (:func:`finetune_seeds`), each its own training run."""
    cfg = run.cfg
    tsne = {"dpo_gen", "dpo_twin", "stages"}
    jobs, keys = [], []
    for name, (folder, loss, source) in data.items():
        if name not in clip_variants:
            continue
        for sd in clip_seeds(cfg):
            for ft in finetune_seeds(cfg, sd):
                tag = run_tag(sd, ft)
                settings = {"base": run.stamp(f"clip_base_s{sd}"), "seed": ft, "variant": name, "loss": loss,
                            "data": Path(folder).name, "pairs": pairs_settings if source == "pairs" else None,
                            "harmonic": run.stamp(f"{source}_pairs") if source in ("harmonic", "faithful", "twinfree")
                            else None,
                            "steps": cfg.clip_finetune_steps, "lr": cfg.clip_finetune_lr, "batch": cfg.clip_batch,
                            "extra": cfg.clip_extra}
                if ft != sd:
                    settings["base_seed"] = sd
                jobs.append((f"clip_{name}_s{tag}", settings, partial(
                    clip_job, cfg, f"local-dir:{base['base', str(sd)]}", folder, loss, cfg.clip_finetune_steps,
                    cfg.clip_finetune_lr, ft, {"tsne": name in tsne and ft == sd})))
                keys.append((name, tag))
    return {key: job["checkpoint"] for key, job in zip(keys, run.stages(jobs))}
