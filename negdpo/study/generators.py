"""The study's generator stages: (autoencoder adaptation), SFT, the Diffusion-DPO variants, and the generator
table (held-out positives repaired by each method, scored against their healthy twins)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from negdpo.core.config import derive_seed
from negdpo.core.figures import write_grid
from negdpo.core.fill import harmonic_fill
from negdpo.core.imageio import to_gray
from negdpo.generator.evaluate import repair_metrics
from negdpo.study.cache import StudyRun
from negdpo.study.data import held_out_positives, lesion_groups, pool_positives, repaint_mask, subject_of
from negdpo.study.variants import GEN_VARIANTS, TWINFREE_VAE, training_stage


# -- training ---------------------------------------------------------------------------------------------------
def _gen_config(cfg: Any, phantoms: Path, out: Path, **overrides):
    from negdpo.generator.train import GenTrainConfig

    base = dict(pretrained_model_name_or_path=cfg.gen_model, dataset_name=str(phantoms), run_name=out.name,
                output_dir=str(out), seed=cfg.seed, beta=cfg.gen_beta, learning_rate=cfg.gen_lr,
                train_batch_size=cfg.gen_batch, sdpo_mu=cfg.gen_sdpo_mu, cache_latents=True, report_to="tensorboard",
                checkpointing_steps=0, validation_steps=0, resume_from_checkpoint="latest")
    base.update(cfg.gen_extra)
    base.update(overrides)
    return GenTrainConfig(**base)


def train_generator(cfg: Any, phantoms: Path, out: Path, **overrides) -> dict:
    """One generator training run (:func:`negdpo.generator.train.train`) into ``out``."""
    from negdpo.generator.train import train

    summary = train(_gen_config(cfg, phantoms, out, **overrides))
    return {"adapter": str(out), "summary": {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}}


def adapt_autoencoder(run: StudyRun) -> str:
    """Stage ``gen_autoencoder`` (``gen_autoencoder_steps`` > 0): the VAE adapted to the phantoms; the model to use."""
    cfg = run.cfg
    if cfg.gen_autoencoder_steps <= 0:
        return cfg.gen_model
    settings = {"phantoms": run.ph_settings, "model": cfg.gen_model, "steps": cfg.gen_autoencoder_steps,
                "lr": cfg.gen_autoencoder_lr, "seed": cfg.seed}

    def adapt(d: Path) -> dict:
        from negdpo.generator.autoencoder import adapt_autoencoder as adapt_vae

        return {"model": adapt_vae(cfg.gen_model, str(run.phantoms), str(d / "model"), steps=cfg.gen_autoencoder_steps,
                                   lr=cfg.gen_autoencoder_lr, seed=cfg.seed, device=run.device,
                                   heldout_splits=("val",))}  # its held-out PSNR: never on test

    return run.stage("gen_autoencoder", settings, adapt)["model"]


def generator_seeds(cfg: Any) -> list[int]:
    """The generator training seeds: ``seed``, ``seed + 1``, ... (``gen_seeds`` of them)."""
    return [cfg.seed + k for k in range(cfg.gen_seeds)]


def gen_suffix(cfg: Any, seed: int) -> str:
    """Stage-name suffix of a generator seed: none for the first (the names before ``gen_seeds``), else ``_g<seed>``."""
    return "" if seed == cfg.seed else f"_g{seed}"


def train_generators(run: StudyRun, gen_variants: list[str], seed: int) -> dict[str, str]:
    """Stages ``gen_sft<sfx>`` and ``gen_<variant><sfx>`` of one generator seed: SFT, then each DPO variant with
    that seed's SFT adapter as reference. Returns {variant: adapter folder} (the pairs' variant always trains)."""
    cfg, sfx = run.cfg, gen_suffix(run.cfg, seed)
    common = {"phantoms": run.ph_settings, "model": run.stamp("gen_autoencoder") or cfg.gen_model,
              "seed": seed, "lr": cfg.gen_lr, "batch": cfg.gen_batch, "extra": cfg.gen_extra}
    adapters = {"sft": run.stage(f"gen_sft{sfx}", common | {"steps": cfg.gen_sft_steps}, lambda d: train_generator(
        cfg, run.phantoms, d, train_method="sft", max_train_steps=cfg.gen_sft_steps, mi_weight=0.0,
        fidelity_weight=0.0, sdpo=False, seed=seed))["adapter"]}
    dpo_variants = {"dpo": dict(mi_weight=0.0, fidelity_weight=0.0, sdpo=False),
                    "dpo_mi": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=False),
                    "dpo_mi_sdpo": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=True)}
    for name, extra in dpo_variants.items():
        if name not in gen_variants and name != cfg.pairs_adapter:
            continue
        settings = common | {"reference": run.stamp(f"gen_sft{sfx}"), "variant": name, "steps": cfg.gen_dpo_steps,
                             "beta": cfg.gen_beta, "mu": cfg.gen_sdpo_mu, **extra}
        adapters[name] = run.stage(f"gen_{name}{sfx}", settings, lambda d, extra=extra: train_generator(
            cfg, run.phantoms, d, train_method="dpo", max_train_steps=cfg.gen_dpo_steps,
            reference_adapter=adapters["sft"], seed=seed, **extra))["adapter"]
    return adapters


# -- scoring ----------------------------------------------------------------------------------------------------
def _residual_lesion(image: np.ndarray, mask: np.ndarray) -> float:
    """1 - the contrast judge: how much the fill stands out from a harmonic interpolation of its surroundings."""
    from negdpo.preference.pairs.judges import ContrastJudge, JudgeItem

    item = JudgeItem(source=image, mask=mask, prompt="", healthy_text="")
    return 1.0 - float(ContrastJudge()(item, [image])[0])


def vae_roundtrip(pipe: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Each gray [0,1] image through the pipeline's autoencoder (posterior mode, at the UNet's native size and
    back, bicubic): what the generator's latent space alone does to an image, no UNet."""
    import torch
    from PIL import Image

    from negdpo.generator.sample import native_size

    size, vae, out = native_size(pipe), pipe.vae, []
    for img in images:
        h, w = img.shape[:2]
        pil = Image.fromarray(np.clip(np.asarray(img, np.float32), 0, 1) * 255.0).convert("L")
        x = np.asarray(pil.resize((size, size), Image.BICUBIC), np.float32) / 255.0
        t = torch.from_numpy(np.repeat(x[None, None], 3, axis=1) * 2.0 - 1.0).to(vae.device, vae.dtype)
        with torch.no_grad():
            rec = vae.decode(vae.encode(t).latent_dist.mode()).sample.float().clamp(-1, 1)
        g = ((rec[0].mean(0) + 1.0) / 2.0).cpu().numpy()
        back = Image.fromarray((g * 255.0 + 0.5).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        out.append(np.asarray(back, np.float32) / 255.0)
    return out


def _repairs(method: str, scans: list, masks: list, *, model: str | None, adapter: str | None, device: str,
             steps: int, seed: int, seam_px: float, sampling: dict | None = None) -> dict[bool | None, list[np.ndarray]]:
    """{paste_back: outputs} of one method on ``scans`` (None: the non-learned methods that change nothing
    outside the mask). ``harmonic_vae``: the harmonic fill through the generator's autoencoder (no UNet); any
    other method samples the generator (``adapter`` None: the untrained UNet)."""
    if method == "identity":
        return {None: [to_gray(s.image) for s in scans]}
    if method == "harmonic":
        return {None: [harmonic_fill(to_gray(s.image), m) for s, m in zip(scans, masks)]}
    from negdpo.generator.sample import inpaint, load_generator, paste_back_blend

    pipe = load_generator(model or "tiny", adapter=adapter, device=device)
    if method == "harmonic_vae":
        nopaste = vae_roundtrip(pipe, [harmonic_fill(to_gray(s.image), m) for s, m in zip(scans, masks)])
        return {False: nopaste, True: [paste_back_blend(to_gray(s.image), o, m, seam_px)
                                       for s, o, m in zip(scans, nopaste, masks)]}
    seeds = [derive_seed("study-gen", s.name, base=seed) for s in scans]
    raw = inpaint(pipe, [s.image for s in scans], masks, [s.prompt or "" for s in scans], seeds,
                  steps=steps, paste_back=False, **(sampling or {}))
    nopaste = [to_gray(np.asarray(o, np.float32)) for o in raw]
    return {False: nopaste, True: [paste_back_blend(to_gray(s.image), o, m, seam_px)
                                   for s, o, m in zip(scans, nopaste, masks)]}


def score_generator(method: str, scans: list, out: Path, *, model: str | None = None, adapter: str | None = None,
                    device: str = "cpu", steps: int = 20, seed: int = 0, seam_px: float = 2.0,
                    sampling: dict | None = None, detector: Any = None, pool_scans: list | None = None,
                    n_boot: int = 1000) -> dict:
    """Repair held-out positives and score them against their twins.

    ``identity`` (no repair) and ``harmonic`` (classical fill) change nothing outside the repaint mask by
    construction (``paste_back`` None). A learned generator samples once without paste-back; the
    pasted output (:func:`negdpo.generator.sample.paste_back_blend`) is derived from the same sample, so
    the two rows differ only by the paste. ``sampling``: ``inpaint``'s ``init`` / ``strength`` (default: from noise).

    Frozen judges (:mod:`negdpo.generator.frozen_judges`, fitted on the pre-training pool only):
    ``detector`` adds ``lesion_prob`` / ``lesion_free`` to every row; ``pool_scans`` (pool positives) are
    repaired the same way to fit the real-vs-generated judge per paste setting, whose AUC on the held-out
    repairs vs their twins is returned under ``realism``.
    """
    opts = dict(model=model, adapter=adapter, device=device, steps=steps, seed=seed, seam_px=seam_px, sampling=sampling)
    masks = [repaint_mask(s.mask) for s in scans]
    outputs = _repairs(method, scans, masks, **opts)
    judged: dict = {"lesion": {}, "realism": []}
    if detector is not None:
        from negdpo.generator.frozen_judges import score_with_judges

        pool_outputs = (_repairs(method, pool_scans, [repaint_mask(s.mask) for s in pool_scans], **opts)
                        if pool_scans else None)
        judged = score_with_judges(detector, method, scans, outputs, pool_scans or None, pool_outputs, seed, n_boot)
    rows = []
    for paste, outs in outputs.items():
        lesion = judged["lesion"].get(paste) or [{}] * len(scans)
        for s, m, o, extra in zip(scans, masks, outs, lesion):
            metrics = repair_metrics(o, to_gray(s.image), to_gray(s.twin), s.mask, m, residual=_residual_lesion)
            rows.append({"method": method, "paste_back": paste, "file": s.name, "subject_id": subject_of(s.name),
                         "modality": s.name.split("_", 1)[0], **metrics, **extra})
    labels = ["positive", "repaint mask"] + [{None: "output", False: "output (no paste-back)",
                                              True: "output (paste-back)"}[p] for p in outputs] + ["healthy twin"]
    grid = [[to_gray(s.image), m.astype(np.float32), *[outs[i] for outs in outputs.values()], to_gray(s.twin)]
            for i, (s, m) in enumerate(list(zip(scans, masks))[:6])]
    write_grid(out / "samples.png", grid, column_labels=labels)
    return {"rows": rows, "grid": str(out / "samples.png"), "realism": json.loads(json.dumps(judged["realism"]))}


def fit_lesion_detector(phantoms: Path, out: Path, seed: int) -> dict:
    """The frozen residual-lesion detector, fitted on the pre-training pool only, and its accuracy on the
    held-out (val + test) real positives vs their twins, overall and per lesion group."""
    from negdpo.core.scans import ScanFolder
    from negdpo.generator.frozen_judges import LesionDetector, detector_report

    pool = ScanFolder(phantoms).load_split("pretrain")
    detector = LesionDetector(seed=seed).fit(pool)
    detector.save(out / "lesion_detector")
    report = detector_report(detector, held_out_positives(phantoms), lesion_groups(phantoms))
    return {"path": str(out / "lesion_detector"), "info": detector.info, "held_out_accuracy": report}


@dataclass
class GeneratorTable:
    """What the generator stages hand to the results: per-image rows, realism AUCs, the frozen judges."""

    rows: list[dict] = field(default_factory=list)
    realism: list[dict] = field(default_factory=list)
    judges: dict | None = None


def _geneval(method: str, phantoms: str, detector: str | None, pool_max: int, out: Path, **opts: Any) -> dict:
    """One ``geneval_<row>`` stage body (picklable: it loads the held-out positives and the judges itself)."""
    from negdpo.generator.frozen_judges import LesionDetector

    pool = pool_positives(Path(phantoms), pool_max) if detector else []
    return score_generator(method, held_out_positives(Path(phantoms)), out, pool_scans=pool,
                           detector=LesionDetector.load(detector) if detector else None, **opts)


def generator_table(run: StudyRun, gen_variants: list[str], adapters: dict[int, dict[str, str]],
                    models: dict[str, str] | None = None, parallel: bool = False) -> GeneratorTable:
    """Stages ``frozen_judges`` and ``geneval_<row>``: every method repairs the held-out positives (learned
    generators with and without paste-back, sampled from ``gen_init`` at ``gen_strength``).

    ``adapters``: {generator seed: {variant: adapter}}. Rows that isolate learning: ``harmonic_vae`` (the
    harmonic fill through the generator's autoencoder, no UNet) and ``harmonic_untrained`` (the same sampling
    as the learned rows with no adapter). Rows carry ``run``: the generator seed of a learned row, ``""`` for
    a row that trains nothing (it pairs with every run). ``models``: {learned row: the base model its adapter
    belongs to} where it is not ``gen_model`` (the twin-free rows: the twin-free autoencoder, which their training
    stage's stamp, hence ``adapter_stamp``, already names); with :data:`TWINFREE_VAE` in it, that row (the fill
    through the twin-free autoencoder) is scored too. ``parallel``: the uncached rows are scored in ``cfg.workers``
    processes (:meth:`StudyRun.stages`; each row seeds itself, so the numbers do not change); leave it off while
    the workers run other stages."""
    models = models or {}
    cfg, phantoms = run.cfg, run.phantoms
    table, detector, pool = GeneratorTable(), None, []
    if cfg.judges and cfg.phantoms_pretrain_n > 0:  # the frozen judges: fitted on the pre-training pool only
        table.judges = run.stage("frozen_judges", {"phantoms": run.ph_settings, "seed": cfg.seed},
                                 lambda d: fit_lesion_detector(phantoms, d, cfg.seed))
        detector, pool = table.judges["path"], pool_positives(phantoms, cfg.judge_pool_max)
    first = cfg.seed
    # (row, variant whose adapter samples (None: no adapter), sampling (None: not sampled), generator seed)
    evals = [(v, v, None, first) for v in ("identity", "harmonic")]
    evals += [(v, v, run.sampling, first) for v in gen_variants]
    if cfg.gen_strength < 1 and cfg.gen_noise_row:  # the pairs' generator from pure noise too: what the model does without a start image
        evals.append((f"{cfg.pairs_adapter}_noise", cfg.pairs_adapter, {"init": "source", "strength": 1.0}, first))
    if cfg.gen_isolation_rows:
        evals += [("harmonic_vae", None, None, first), ("harmonic_untrained", None, run.sampling, first)]
    if TWINFREE_VAE in models:  # the twin-free rows' baseline: the fill through their own autoencoder
        evals.append((TWINFREE_VAE, None, None, first))
    evals += [(f"{v}_g{gs}", v, run.sampling, gs) for gs in adapters if gs != first for v in gen_variants]
    jobs = []
    for name, variant, how, gs in evals:
        settings = {"variant": variant, "adapter_stamp": variant and run.stamp(
                        f"gen_{training_stage(variant)}{gen_suffix(cfg, gs)}"),
                    "phantoms": run.ph_settings, "steps": cfg.gen_sample_steps, "seam_px": cfg.gen_seam_px,
                    "seed": cfg.seed, "sampling": how, "judges": table.judges and run.stamp("frozen_judges"),
                    "pool": [s.name for s in pool]}
        if name in ("harmonic_vae", "harmonic_untrained"):
            settings |= {"variant": name, "model": run.stamp("gen_autoencoder") or cfg.gen_model}
        if name == TWINFREE_VAE:
            settings |= {"variant": name, "model": run.stamp("gen_autoencoder_twinfree") or models[name]}
        method = "harmonic_vae" if name == TWINFREE_VAE else name.rsplit("_g", 1)[0] if gs != first else name
        model = models.get(name) or models.get(variant, cfg.gen_model)
        adapter = adapters[gs].get(variant) if variant else None
        jobs.append((f"geneval_{name}", settings, partial(
            _geneval, method, str(phantoms), detector, cfg.judge_pool_max, model=model, adapter=adapter,
            device=run.device, steps=cfg.gen_sample_steps, seed=cfg.seed, seam_px=cfg.gen_seam_px, sampling=how,
            n_boot=cfg.bootstrap)))
    scored = run.stages(jobs) if parallel else [run.stage(*job) for job in jobs]
    for (name, variant, how, gs), res in zip(evals, scored):
        learned = variant in GEN_VARIANTS or variant in models or name.endswith("_noise")
        row_name = {"method": name} if name == TWINFREE_VAE else {}  # scored as harmonic_vae, reported as itself
        table.rows += [{**r, **row_name, "run": str(gs) if learned else ""} for r in res["rows"]]
        table.realism += [{**r, **row_name, "run": str(gs) if learned else ""} for r in res.get("realism", [])]
        if how is not None and gs == first or name in ("harmonic_vae", TWINFREE_VAE):
            shutil.copy(res["grid"], run.out / "figures" / f"generator_{name}.png")
    return table
