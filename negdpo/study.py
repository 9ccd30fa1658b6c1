"""``negdpo study --config configs/phantom_study.yaml [--preset quick|full]``: the whole chain on phantoms.

The phantom set has what no public data set has: the healthy twin of every positive. The study uses it
to score each part of the method with numbers:

    phantoms -> (autoencoder adapted to the phantoms) -> SFT of the inpainting model on healthy scans
             -> Diffusion-DPO variants (DPO, DPO+MI, DPO+MI+SDPO; reference = the SFT model)
             -> generator table on held-out (val+test) positives vs their twins
             -> base CLIP (contrastive pre-training on phantom image/prompt pairs)
             -> generator + CLIP pairs from the DPO+MI+SDPO variant, judged with the base CLIP
             -> fine-tunes of the base: DHN-NCE, CLIP-DPO (generated negatives), CLIP-DPO (twin
                negatives = oracle upper bound), CLIP-DPO + attention entropy, two-stage OT
             -> zero-shot segmentation of the test subjects (M2IB -> k-means -> [SAM]) per checkpoint
             -> results/phantom_study/results.md (+ figures, metrics CSV/JSON)

Every stage writes into ``work_dir/<stage>/`` and leaves a ``stage.json`` stamp holding its settings;
a rerun skips stamped stages whose settings are unchanged (training stages also resume from their last
Accelerate checkpoint), so an interrupted study continues where it stopped. Same seed -> same numbers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from negdpo.core.config import resolve_device
from negdpo.core.stats import fmt_ci, subject_ci

logger = logging.getLogger("negdpo.study")

GEN_VARIANTS = ("sft", "dpo", "dpo_mi", "dpo_mi_sdpo")
CLIP_VARIANTS = ("base", "dhn_nce", "dpo_gen", "dpo_twin", "dpo_entropy", "stages")
CLIP_LABELS = {"base": "base (contrastive pre-training)", "dhn_nce": "DHN-NCE (baseline)",
               "dpo_gen": "CLIP-DPO, generated negatives", "dpo_twin": "CLIP-DPO, twin negatives (oracle)",
               "dpo_entropy": "CLIP-DPO + attention entropy", "stages": "two-stage OT"}
GEN_LABELS = {"identity": "positive itself (no repair)", "harmonic": "harmonic fill (classical)",
              "sft": "SFT only", "dpo": "DPO", "dpo_mi": "DPO + MI", "dpo_mi_sdpo": "DPO + MI + SDPO"}


@dataclass
class StudyConfig:
    """Settings of one study; the presets in configs/phantom_study.yaml fill these."""

    preset: str = "quick"
    out: str = "results/phantom_study"
    work_dir: str = "outputs/phantom_study"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0 = torch default; 1 is much faster on a shared 2-core CPU)
    # phantoms
    phantoms_n: int = 40
    phantoms_size: int = 64
    phantoms_slices: int = 2
    # which variants to run (a reduced study runs a subset; the tables show what ran)
    gen_variants: list[str] = field(default_factory=lambda: list(GEN_VARIANTS))
    clip_variants: list[str] = field(default_factory=lambda: list(CLIP_VARIANTS))
    # generator (tiny or a real SD-inpainting id/folder)
    gen_model: str = "tiny"
    gen_autoencoder_steps: int = 0  # > 0: adapt the VAE to the phantoms first (negdpo.generator.autoencoder)
    gen_autoencoder_lr: float = 1e-3
    gen_sft_steps: int = 60
    gen_dpo_steps: int = 60
    gen_batch: int = 4
    gen_lr: float = 1e-3
    gen_beta: float = 5000.0
    gen_mi_weight: float = 0.1
    gen_fidelity_weight: float = 0.01
    gen_sdpo_mu: float = 0.9
    gen_sample_steps: int = 20
    gen_extra: dict = field(default_factory=dict)
    # pairs
    pairs_k: int = 2
    pairs_steps: int = 10
    pairs_adapter: str = "dpo_mi_sdpo"
    pairs_extra: dict = field(default_factory=dict)  # BuildConfig overrides
    # CLIP
    clip_model: str = "tiny"
    clip_pretrain_steps: int = 150
    clip_finetune_steps: int = 60
    clip_batch: int = 8
    clip_pretrain_lr: float = 5e-4
    clip_finetune_lr: float = 5e-5
    clip_extra: dict = field(default_factory=dict)
    # segmentation
    eval_saliency: str = "m2ib"
    eval_sam: str = "none"
    eval_extra: dict = field(default_factory=dict)
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        """Types, ranges, variant names and every ``*_extra`` key are checked before any stage runs."""
        from negdpo.core.config import check, check_finite_positive, check_mapping, check_positive

        check_positive(self, "phantoms_n", "phantoms_size", "phantoms_slices", "gen_sft_steps", "gen_dpo_steps",
                       "gen_batch", "gen_sample_steps", "pairs_k", "pairs_steps", "clip_pretrain_steps",
                       "clip_finetune_steps", "clip_batch", "bootstrap")
        check_finite_positive(self, "gen_lr", "gen_beta", "gen_autoencoder_lr", "clip_pretrain_lr", "clip_finetune_lr")
        check(self.gen_autoencoder_steps >= 0, "gen_autoencoder_steps", self.gen_autoencoder_steps, "must be >= 0")
        bad = sorted(set(self.gen_variants) - set(GEN_VARIANTS))
        check(not bad, "gen_variants", self.gen_variants, f"unknown {bad}; choose from {list(GEN_VARIANTS)}")
        bad = sorted(set(self.clip_variants) - set(CLIP_VARIANTS))
        check(not bad, "clip_variants", self.clip_variants, f"unknown {bad}; choose from {list(CLIP_VARIANTS)}")
        check(self.pairs_adapter in GEN_VARIANTS[1:], "pairs_adapter", self.pairs_adapter,
              f"one of {list(GEN_VARIANTS[1:])}")
        for key, cls in _extra_targets().items():
            setattr(self, key, check_mapping(cls, getattr(self, key), key))


def _extra_targets() -> dict[str, type]:
    """The config class each ``*_extra`` section overrides."""
    from negdpo.generator.train import GenTrainConfig
    from negdpo.preference.clip.train import ClipTrainConfig
    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.segmentation.evaluate import EvalConfig

    return {"gen_extra": GenTrainConfig, "pairs_extra": BuildConfig, "clip_extra": ClipTrainConfig,
            "eval_extra": EvalConfig}


# -- stage bookkeeping -----------------------------------------------------------------------------
def _stamp_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(work: Path, name: str, settings: dict, fn: Callable[[Path], dict]) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage.json`` says it already ran with the same settings."""
    stage_dir = work / name
    stamp = stage_dir / "stage.json"
    key = _stamp_key(settings)
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == key:
            logger.info("stage %s: cached", name)
            return info["result"]
        logger.info("stage %s: settings changed, rerunning from scratch", name)
        shutil.rmtree(stage_dir)  # never resume another setting's checkpoints
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = fn(stage_dir)
    info = {"key": key, "settings": settings, "result": result, "seconds": round(time.perf_counter() - t0, 1)}
    tmp = stamp.with_name(".stage.json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(stamp)
    print(f"[study] {name}: done in {info['seconds']:.0f}s", flush=True)
    return result


# -- generator stages -------------------------------------------------------------------------------
def _gen_config(cfg: StudyConfig, phantoms: Path, out: Path, **overrides):
    from negdpo.generator.train import GenTrainConfig

    base = dict(pretrained_model_name_or_path=cfg.gen_model, dataset_name=str(phantoms), run_name=out.name,
                output_dir=str(out),
                seed=cfg.seed, beta=cfg.gen_beta, learning_rate=cfg.gen_lr, train_batch_size=cfg.gen_batch,
                sdpo_mu=cfg.gen_sdpo_mu, cache_latents=True, report_to="tensorboard", checkpointing_steps=0,
                validation_steps=0, resume_from_checkpoint="latest")
    base.update(cfg.gen_extra)
    base.update(overrides)
    return GenTrainConfig(**base)


def train_generator(cfg: StudyConfig, phantoms: Path, out: Path, **overrides) -> dict:
    from negdpo.generator.train import train

    summary = train(_gen_config(cfg, phantoms, out, **overrides))
    return {"adapter": str(out), "summary": {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}}


def _residual_lesion(image: np.ndarray, mask: np.ndarray) -> float:
    """1 - the contrast judge: how much the fill stands out from a harmonic interpolation of its surroundings."""
    from negdpo.preference.pairs.judges import ContrastJudge, JudgeItem

    item = JudgeItem(source=image, mask=mask, prompt="", healthy_text="")
    return 1.0 - float(ContrastJudge()(item, [image])[0])


def held_out_positives(phantoms: Path) -> list:
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(phantoms)
    return [s for split in ("val", "test") if split in folder.splits() for s in folder.load_split(split) if s.positive]


def score_generator(cfg: StudyConfig, variant: str, adapter: str | None, scans: list, out: Path) -> dict:
    """Repaint held-out positives (no paste-back, so preservation is measured) and score vs twins."""
    from scipy import ndimage

    from negdpo.core.config import derive_seed
    from negdpo.core.figures import write_grid
    from negdpo.core.imageio import to_gray
    from negdpo.preference.pairs.judges import harmonic_fill

    masks = [ndimage.binary_dilation(s.mask, iterations=2) for s in scans]  # repaint region; outside = ~mask
    if variant == "identity":
        outputs = [s.image for s in scans]
    elif variant == "harmonic":
        outputs = [harmonic_fill(to_gray(s.image), m) for s, m in zip(scans, masks)]
    else:
        from negdpo.generator.sample import inpaint, load_generator

        pipe = load_generator(cfg.gen_model, adapter=adapter, device=resolve_device(cfg.device))
        seeds = [derive_seed("study-gen", s.name, base=cfg.seed) for s in scans]
        outputs = inpaint(pipe, [s.image for s in scans], masks, [s.prompt or "" for s in scans], seeds,
                          steps=cfg.gen_sample_steps, paste_back=False)
    from negdpo.generator.evaluate import repair_metrics

    rows = []
    for s, m, o in zip(scans, masks, outputs):
        o = to_gray(np.asarray(o, np.float32))
        metrics = repair_metrics(o, to_gray(s.image), to_gray(s.twin), s.mask, m, residual=_residual_lesion)
        rows.append({"variant": variant, "file": s.name, "subject_id": s.name.rsplit("_", 1)[0], **metrics})
    _write_csv(out / "per_image.csv", rows)
    grid = [[to_gray(s.image), s.mask.astype(np.float32), to_gray(np.asarray(o, np.float32)), to_gray(s.twin)]
            for s, o in list(zip(scans, outputs))[:6]]
    write_grid(out / "samples.png", grid, column_labels=["positive", "repaint mask", "output", "healthy twin"])
    return {"rows": rows, "grid": str(out / "samples.png")}


# -- CLIP stages ------------------------------------------------------------------------------------
def train_clip(cfg: StudyConfig, out: Path, model: str, data: str, loss: str, steps: int, lr: float,
               **overrides) -> dict:
    from negdpo.preference.clip.train import ClipTrainConfig, train

    base = dict(pretrained_model_name_or_path=model, dataset_name=data, output_dir=str(out), run_name=out.name,
                loss=loss, seed=cfg.seed, max_train_steps=steps, learning_rate=lr, train_batch_size=cfg.clip_batch,
                report_to="tensorboard", resume_from_checkpoint="latest", progress_bar=True, validation_steps=0,
                checkpointing_steps=0)
    base.update(overrides)
    base.update(cfg.clip_extra)  # the user's extras win (e.g. tsne: false for a quick run)
    summary = train(ClipTrainConfig(**base))
    return {"checkpoint": str(summary.get("checkpoint", out / "final")),
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}}


# -- report -----------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _by_subject(rows: list[dict], key: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if v is None or v == "":
            continue
        out.setdefault(str(r["subject_id"]), []).append(float(v))
    return out


def generator_table(gen_rows: dict[str, list[dict]], cfg: StudyConfig) -> tuple[str, dict]:
    cols = [("inside_err", "inside-mask error vs twin ↓"), ("outside_mi", "outside MI (nats) ↑"),
            ("outside_psnr", "outside PSNR (dB) ↑"), ("residual_lesion", "residual-lesion score ↓")]
    lines = ["| generator | n img | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    stats: dict[str, dict] = {}
    for variant, rows in gen_rows.items():
        stats[variant] = {k: subject_ci(_by_subject(rows, k), cfg.bootstrap, cfg.seed) for k, _ in cols}
        cells = [fmt_ci(stats[variant][k], 2 if k == "outside_psnr" else 3) for k, _ in cols]
        lines.append(f"| {GEN_LABELS.get(variant, variant)} | {len(rows)} | " + " | ".join(cells) + " |")
    ceiling = next(iter(gen_rows.values()))
    mi_twin = subject_ci(_by_subject(ceiling, "twin_outside_mi"), cfg.bootstrap, cfg.seed)
    lines.append("")
    lines.append(f"Outside-mask MI of the healthy twin itself against the source (the ceiling): {fmt_ci(mi_twin)}.")
    return "\n".join(lines), stats


def segmentation_table(eval_rows: list[dict], cfg: StudyConfig) -> tuple[str, dict]:
    cols = [("dice", "Dice"), ("iou", "IoU"), ("nsd", "NSD (2 px)"), ("control_dice", "Dice, irrelevant prompt")]
    lines = ["| CLIP checkpoint | n img | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    stats: dict[str, dict] = {}
    for ckpt in CLIP_VARIANTS:
        rows = [r for r in eval_rows if r.get("checkpoint") == ckpt and int(r.get("positive", 1))]
        if not rows:
            continue
        for r in rows:
            r.setdefault("subject_id", str(r["image"]).rsplit("_", 1)[0])
        stats[ckpt] = {k: subject_ci(_by_subject(rows, k), cfg.bootstrap, cfg.seed) for k, _ in cols}
        cells = [fmt_ci(stats[ckpt][k]) for k, _ in cols]
        lines.append(f"| {CLIP_LABELS[ckpt]} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def plot_curves(logs: dict[str, Path], out: Path, keys: tuple[str, ...], title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, path in logs.items():
        if path.exists():
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            series[name] = recs
    if not series:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4))
    axes = np.atleast_1d(axes)
    colors = {name: f"C{i}" for i, name in enumerate(series)}  # one colour per run in every panel
    for ax, key in zip(axes, keys):
        for name, recs in series.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, color=colors[name], lw=1.2)
        if key == "loss" and all(v > 0 for recs in series.values() for r in recs if (v := r.get(key)) is not None):
            ax.set_yscale("log")  # SFT (MSE) and DPO losses differ by orders of magnitude
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# -- the study --------------------------------------------------------------------------------------
def run_study(cfg: StudyConfig) -> dict:
    from negdpo.core.config import code_version, seed_everything
    from negdpo.core.phantoms import ensure_phantoms

    gen_variants = [v for v in GEN_VARIANTS if v in cfg.gen_variants or v == "sft"]  # SFT = every DPO's reference
    clip_variants = [v for v in CLIP_VARIANTS if v in cfg.clip_variants or v == "base"]  # base = every fine-tune's start
    work, out = Path(cfg.work_dir), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    ph_settings = {"n": cfg.phantoms_n, "size": cfg.phantoms_size, "slices": cfg.phantoms_slices, "seed": cfg.seed}
    phantoms = Path(run_stage(work, "phantoms", ph_settings, lambda d: {"path": str(ensure_phantoms(
        d / "data", n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.seed, slices=cfg.phantoms_slices))})["path"])

    # 1. generator: (autoencoder adaptation), SFT, then DPO variants with the SFT adapter as reference
    gen_model = cfg.gen_model
    if cfg.gen_autoencoder_steps > 0:
        ae_set = {"phantoms": ph_settings, "model": cfg.gen_model, "steps": cfg.gen_autoencoder_steps,
                  "lr": cfg.gen_autoencoder_lr, "seed": cfg.seed}

        def adapt(d: Path) -> dict:
            from negdpo.generator.autoencoder import adapt_autoencoder

            return {"model": adapt_autoencoder(cfg.gen_model, str(phantoms), str(d / "model"),
                                               steps=cfg.gen_autoencoder_steps, lr=cfg.gen_autoencoder_lr,
                                               seed=cfg.seed, device=resolve_device(cfg.device))}

        gen_model = run_stage(work, "gen_autoencoder", ae_set, adapt)["model"]
    cfg = replace(cfg, gen_model=gen_model)
    common = {"phantoms": ph_settings, "model": _stamp_of(work, "gen_autoencoder") or cfg.gen_model,
              "seed": cfg.seed, "lr": cfg.gen_lr, "batch": cfg.gen_batch, "extra": cfg.gen_extra}
    adapters: dict[str, str] = {}
    sft_set = common | {"steps": cfg.gen_sft_steps}
    adapters["sft"] = run_stage(work, "gen_sft", sft_set, lambda d: train_generator(
        cfg, phantoms, d, train_method="sft", max_train_steps=cfg.gen_sft_steps, mi_weight=0.0,
        fidelity_weight=0.0, sdpo=False))["adapter"]
    dpo_variants = {"dpo": dict(mi_weight=0.0, fidelity_weight=0.0, sdpo=False),
                    "dpo_mi": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=False),
                    "dpo_mi_sdpo": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=True)}
    for name, extra in dpo_variants.items():
        if name not in gen_variants and name != cfg.pairs_adapter:
            continue
        settings = common | sft_set | {"variant": name, "steps": cfg.gen_dpo_steps, "beta": cfg.gen_beta,
                                       "mu": cfg.gen_sdpo_mu, **extra}
        adapters[name] = run_stage(work, f"gen_{name}", settings, lambda d, extra=extra: train_generator(
            cfg, phantoms, d, train_method="dpo", max_train_steps=cfg.gen_dpo_steps,
            reference_adapter=adapters["sft"], **extra))["adapter"]

    # 2. generator table on held-out positives
    scans = held_out_positives(phantoms)
    gen_rows: dict[str, list[dict]] = {}
    for variant in ("identity", "harmonic", *gen_variants):
        settings = {"variant": variant, "adapter_stamp": _stamp_of(work, f"gen_{variant}"),
                    "steps": cfg.gen_sample_steps, "phantoms": ph_settings}
        res = run_stage(work, f"geneval_{variant}", settings, lambda d, v=variant: score_generator(
            cfg, v, adapters.get(v), scans, d))
        gen_rows[variant] = res["rows"]
        if variant in GEN_VARIANTS:
            shutil.copy(res["grid"], out / "figures" / f"generator_{variant}.png")

    # 3. base CLIP: contrastive pre-training on phantom image/prompt pairs
    clip_common = {"phantoms": ph_settings, "model": cfg.clip_model, "seed": cfg.seed, "batch": cfg.clip_batch,
                   "extra": cfg.clip_extra}
    base_set = clip_common | {"steps": cfg.clip_pretrain_steps, "lr": cfg.clip_pretrain_lr}
    ckpts: dict[str, str] = {}
    ckpts["base"] = run_stage(work, "clip_base", base_set, lambda d: train_clip(
        cfg, d, cfg.clip_model, str(phantoms), "clip", cfg.clip_pretrain_steps, cfg.clip_pretrain_lr,
        retention_weight=1.0, retention_dedup=True, freeze_logit_scale=False, tsne=False))["checkpoint"]
    base_model = f"local-dir:{ckpts['base']}"

    # 4. preference pairs from the chosen generator variant, judged with the base CLIP
    pairs_set = {"adapter_stamp": _stamp_of(work, f"gen_{cfg.pairs_adapter}"), "k": cfg.pairs_k, "extra": cfg.pairs_extra,
                 "steps": cfg.pairs_steps, "phantoms": ph_settings, "clip": _stamp_of(work, "clip_base")}

    def build_pairs(d: Path) -> dict:
        from negdpo.preference.pairs.build import BuildConfig, run_build

        summary = run_build(BuildConfig(data=str(phantoms), out=str(d / "pairs"), generator=cfg.gen_model,
                                        adapter=adapters[cfg.pairs_adapter], k=cfg.pairs_k, steps=cfg.pairs_steps,
                                        seed=cfg.seed, clip=base_model, device=cfg.device,
                                        **cfg.pairs_extra))
        keep = ("rows", "dropped", "seconds", "judge", "scans_per_s", "report")
        return {"path": str(d / "pairs"), "summary": json.loads(json.dumps(
            {k: summary.get(k) for k in keep}, default=str))}

    pairs = run_stage(work, "pairs", pairs_set, build_pairs)

    # 5. fine-tunes of the base
    finetunes = {"dhn_nce": (str(phantoms), "dhn_nce", {"tsne": False}),
                 "dpo_gen": (pairs["path"], "dpo", {"tsne": True}),
                 "dpo_twin": (str(phantoms), "dpo", {"tsne": True}),
                 "dpo_entropy": (pairs["path"], "dpo+entropy", {"tsne": False}),
                 "stages": (pairs["path"], "stages", {"tsne": True})}
    for name, (data, loss, extra) in finetunes.items():
        if name not in clip_variants:
            continue
        settings = clip_common | base_set | {"variant": name, "loss": loss, "data": Path(data).name,
                                             "pairs": pairs_set if data == pairs["path"] else None,
                                             "steps": cfg.clip_finetune_steps, "lr": cfg.clip_finetune_lr}
        ckpts[name] = run_stage(work, f"clip_{name}", settings, lambda d, a=(data, loss, extra): train_clip(
            cfg, d, base_model, a[0], a[1], cfg.clip_finetune_steps, cfg.clip_finetune_lr, **a[2]))["checkpoint"]

    # 6. zero-shot segmentation of the test subjects
    eval_set = {"clips": {k: _stamp_of(work, f"clip_{k}") for k in ckpts}, "saliency": cfg.eval_saliency,
                "sam": cfg.eval_sam, "extra": cfg.eval_extra, "phantoms": ph_settings}

    def run_eval(d: Path) -> dict:
        from negdpo.segmentation.evaluate import evaluate

        options = {"split": "test", "saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "seed": cfg.seed,
                   "device": cfg.device, "bootstrap": 200, "overwrite_output_dir": True} | cfg.eval_extra
        res = evaluate(str(phantoms), {k: f"local-dir:{v}" for k, v in ckpts.items()}, str(d / "eval"),
                       overwrite_output_dir=True, **options)  # the stage owns d: a rerun replaces its evaluation
        return {"rows": json.loads(json.dumps(res.rows, default=float)), "report": str(d / "eval" / "report.md")}

    seg = run_stage(work, "evaluate", eval_set, run_eval)

    # 7. figures and results.md
    plot_curves({v: Path(adapters[v]) / "metrics.jsonl" for v in gen_variants},
                out / "figures" / "generator_curves.png", ("loss", "implicit_acc"),
                            "Generator training (SFT: denoising loss; DPO variants: Diffusion-DPO)")
    plot_curves({v: Path(ckpts[v]).parent / "metrics.jsonl" for v in clip_variants},
                             out / "figures" / "clip_curves.png", ("loss", "rewards/accuracies"), "CLIP training")
    for name in ("dpo_gen", "dpo_twin", "stages"):
        if name in ckpts:
            for tsne in Path(ckpts[name]).parent.glob("tsne*.png"):
                shutil.copy(tsne, out / "figures" / f"tsne_{name}.png")
    gen_md, gen_stats = generator_table(gen_rows, cfg)
    seg_md, seg_stats = segmentation_table(seg["rows"], cfg)
    _write_csv(out / "generator_metrics.csv", [r for rows in gen_rows.values() for r in rows])
    _write_csv(out / "segmentation_metrics.csv", seg["rows"])
    results = {"generator": gen_stats, "segmentation": seg_stats, "config": asdict(cfg),
               "code_version": code_version(), "pairs": pairs["summary"]}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(render_markdown(cfg, gen_md, seg_md, out, pairs, time.perf_counter() - t_start))
    print(f"[study] results: {out / 'results.md'}", flush=True)
    return results


def _stamp_of(work: Path, stage: str) -> str | None:
    stamp = work / stage / "stage.json"
    return json.loads(stamp.read_text())["key"] if stamp.exists() else None


def render_markdown(cfg: StudyConfig, gen_md: str, seg_md: str, out: Path, pairs: dict, seconds: float) -> str:
    from negdpo.core.config import code_version

    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    psum = pairs.get("summary", {})
    lines = [
        "# Phantom study", "",
        f"Preset `{cfg.preset}`, seed {cfg.seed}, code `{code_version()}`. Produced by "
        f"`negdpo study --config configs/phantom_study.yaml --preset {cfg.preset}` (this run: {seconds:.0f} s "
        "including cached stages). Every number below is computed by that command; rerunning with the same seed "
        "reproduces them.", "",
        f"Phantoms: {cfg.phantoms_n} subjects x {cfg.phantoms_slices} slices at {cfg.phantoms_size} px (MRI-like + "
        "ultrasound-like, 25% healthy-only subjects, subject-level splits). Intervals are 95% bootstrap CIs over "
        f"subjects ({cfg.bootstrap} resamples; each subject = mean of its images).", "",
        "## Generator: tumour removal on held-out positives (val + test subjects)", "",
        "Each variant repaints the dilated lesion mask of every held-out positive (no paste-back, so the "
        "outside is the model's own). *Inside-mask error vs twin*: mean |output − healthy twin| inside the "
        "lesion (what a perfect remover scores 0 on). *Outside MI / PSNR*: weighted Parzen MI and PSNR against "
        "the source outside the 2-px-dilated mask (anatomy preservation). *Residual-lesion score*: 1 − the "
        "contrast judge (how much the fill stands out from a harmonic interpolation of its surroundings).", "",
        gen_md, "",
        "## Preference pairs", "",
        f"Built with `negdpo build-pairs` from the `{cfg.pairs_adapter}` generator, K = {cfg.pairs_k} candidates "
        f"per positive, {cfg.pairs_steps} sampling steps, judged with the base CLIP + phantom judges. "
        f"Rows per kind and split: `{json.dumps(psum.get('rows'))}`; dropped: `{json.dumps(psum.get('dropped'))}`. "
        "Quality report: `pairs/report/report.md` under the work dir.", "",
        "## Zero-shot segmentation of the test subjects", "",
        f"Saliency `{cfg.eval_saliency}` → k-means → largest component → SAM `{cfg.eval_sam}` "
        "(`none` = the coarse mask is the prediction). Scans with a lesion only; the irrelevant-prompt column "
        "runs the same chain with an unrelated prompt (a map that ignores the prompt scores the same there).", "",
        seg_md, "",
        "## Figures", "",
    ]
    lines += [f"![{f}](figures/{f})" for f in figs]
    lines += ["", "## Settings", "", "```yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------------------
def load_study_config(path: str | None, preset: str | None, overrides: list[str]) -> StudyConfig:
    """The bundled or given YAML (shared keys + ``presets:``), the preset, then ``--key value`` overrides."""
    from negdpo.core.config import bundled_config, parse_config

    argv = ["--config", path or str(bundled_config("phantom_study.yaml"))]
    argv += ["--preset", preset] if preset else []
    return parse_config(StudyConfig, argv + list(overrides))


def _run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from negdpo.core.config import parse_config

        parse_config(StudyConfig, ["--help"])
    cfg = load_study_config(None, None, argv)
    run_study(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("negdpo study", _run, argv)
