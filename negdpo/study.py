"""``negdpo study --config configs/phantom_study.yaml [--preset quick|medium|full]``: the whole chain on phantoms.

The phantom set has what no public data set has: the healthy twin of every positive. The study uses it
to score each part of the method with numbers:

    phantoms (+ a disjoint pre-training pool) -> (autoencoder adapted to the phantoms) -> SFT of the
             inpainting model on healthy scans -> Diffusion-DPO variants (DPO, DPO+MI, DPO+MI+SDPO)
             -> generator table on held-out (val+test) positives vs their twins, each learned generator
                with and without paste-back, per modality (sampled from gen_init at gen_strength)
             -> base CLIP (contrastive pre-training on the pre-training pool), one per seed
             -> generator + CLIP pairs from the DPO+MI+SDPO variant, judged with the base CLIP
             -> fine-tunes of each seed's base: DHN-NCE, CLIP-DPO (generated negatives), CLIP-DPO (twin
                negatives = oracle), CLIP-DPO (harmonic-fill negatives = no-generator control),
                CLIP-DPO + attention entropy, two-stage OT
             -> zero-shot segmentation of the test subjects (M2IB -> k-means -> [SAM]) per checkpoint and
                prompt (report | one word | irrelevant), the oracle-box ceiling when SAM runs
             -> results/phantom_study/results.json (the contract, negdpo.study_tables) + results.md

Every stage writes into ``work_dir/<stage>/`` and leaves a ``stage.json`` stamp holding its settings
(the preset's name included, so no cached stage is shared between presets); a rerun skips stamped
stages whose settings are unchanged (training stages also resume from their last Accelerate
checkpoint), so an interrupted study continues where it stopped. Same seed -> same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from negdpo.core.config import resolve_device
from negdpo.core.fill import INITS
from negdpo.study_eval import held_out_positives, score_generator  # noqa: F401  (re-exported)
from negdpo.study_stages import PG_ROWS, json_rows, stamp_of
from negdpo.study_tables import CLIP_LABELS, CLIP_VARIANTS, GEN_LABELS  # noqa: F401  (re-exported)
from negdpo.study_training import clip_job, prefetch_parallel, train_clip, train_generator  # noqa: F401

logger = logging.getLogger("negdpo.study")

GEN_VARIANTS = ("sft", "dpo", "dpo_mi", "dpo_mi_sdpo")


@dataclass
class StudyConfig:
    """Settings of one study; the presets in configs/phantom_study.yaml fill these."""

    preset: str = "quick"
    out: str = "results/phantom_study"
    work_dir: str = "outputs/phantom_study"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0 = torch default; 1 is much faster on a shared 2-core CPU)
    workers: int = 1  # processes for independent CLIP stages (base per seed, fine-tunes); same numbers, less wall time
    # phantoms
    phantoms_n: int = 40
    phantoms_size: int = 64
    phantoms_slices: int = 2
    phantoms_pretrain_n: int = 0  # subjects of the disjoint pre-training pool (0: the base CLIP pre-trains on train)
    phantoms_lesion_area: list[float] | None = None  # [lo, hi] share of the image; None = the original radius law
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
    gen_seam_px: float = 2.0  # soft seam of the paste-back rows (generator.sample.paste_back_blend)
    gen_init: str = "source"  # what the learned generators' sampling (table rows and pairs) starts from: source |
    gen_strength: float = 1.0  # harmonic (generator.sample.inpaint's init), noised to this strength (1 = pure noise)
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
    clip_seeds: int = 1  # every CLIP variant (base included) is trained with seeds seed, seed+1, ...
    clip_extra: dict = field(default_factory=dict)
    # segmentation
    eval_saliency: str = "m2ib"
    eval_sam: str = "none"
    eval_extra: dict = field(default_factory=dict)
    eval_reference_saliency: str = ""  # e.g. m2ib: the base CLIPs also through this saliency (row base_reference)
    eval_reference_extra: dict = field(default_factory=dict)  # EvalConfig overrides of that reference evaluation
    prompt_word: str = "tumor"  # the one-word prompt of the prompt-sensitivity rows
    prompt_irrelevant: str = "a photo of a cat sitting on a chair"
    bootstrap: int = 2000
    # stage 2 (negdpo.segmentation.prompt_generator, prompt-free, on the first seed's chains) and VL-SAM rows
    pg_steps: int = 0  # prompt-generator training steps per row (0 = no pg_* rows)
    pg_lr: float = 1e-2
    pg_batch: int = 2
    pg_rows: list[str] = field(default_factory=lambda: list(PG_ROWS))
    pg_best_variant: str = "dpo_gen"  # the fine-tuned chain of pg_pseudo_best, fixed in advance (no peek at test)
    pg_extra: dict = field(default_factory=dict)  # SegTrainConfig overrides
    vlm_steps: int = 0  # report-generation steps of the tiny VLM on the pre-training pool (0 = no vlsam row)
    vlm_lr: float = 2e-3
    vlm_batch: int = 8
    vlm_extra: dict = field(default_factory=dict)  # VlmTrainConfig overrides
    # frozen judges of the generator table (negdpo.generator.frozen_judges), fitted on the pool only
    judges: bool = True  # needs phantoms_pretrain_n > 0
    judge_pool_max: int = 48  # pool positives each generator repairs to fit the realism judge (0 = no realism AUC)
    # the tiny SAM pre-trained on the pool (negdpo.segmentation.sam_pretrain); 0 = off (random tiny SAM)
    sam_pretrain_steps: int = 0
    sam_pretrain_extra: dict = field(default_factory=dict)  # SamPretrainConfig overrides (architecture, prompts, lr)

    def __post_init__(self) -> None:
        """Types, ranges, variant names and every ``*_extra`` key are checked before any stage runs."""
        from negdpo.core.config import check, check_finite_positive, check_mapping, check_positive

        check_positive(self, "workers", "phantoms_n", "phantoms_size", "phantoms_slices", "gen_sft_steps", "gen_dpo_steps",
                       "gen_batch", "gen_sample_steps", "pairs_k", "pairs_steps", "clip_pretrain_steps",
                       "clip_finetune_steps", "clip_batch", "bootstrap", "clip_seeds", "pg_batch", "vlm_batch")
        check_finite_positive(self, "gen_lr", "gen_beta", "gen_autoencoder_lr", "clip_pretrain_lr", "clip_finetune_lr",
                              "pg_lr", "vlm_lr")
        for key in ("pg_steps", "vlm_steps", "judge_pool_max", "sam_pretrain_steps"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0 (0 = off)")
        bad = sorted(set(self.pg_rows) - set(PG_ROWS))
        check(not bad, "pg_rows", self.pg_rows, f"unknown {bad}; choose from {list(PG_ROWS)}")
        check(self.pg_best_variant in CLIP_VARIANTS[1:], "pg_best_variant", self.pg_best_variant,
              f"one of the fine-tuned variants {list(CLIP_VARIANTS[1:])}")
        check(self.gen_init in INITS, "gen_init", self.gen_init, f"one of {list(INITS)}")
        check(0 < self.gen_strength <= 1, "gen_strength", self.gen_strength, "must be in (0, 1]")
        check(self.gen_autoencoder_steps >= 0, "gen_autoencoder_steps", self.gen_autoencoder_steps, "must be >= 0")
        check(self.phantoms_pretrain_n >= 0, "phantoms_pretrain_n", self.phantoms_pretrain_n, "must be >= 0")
        area = self.phantoms_lesion_area
        check(area is None or (len(area) == 2 and 0 < area[0] <= area[1] < 0.5), "phantoms_lesion_area", area,
              "[lo, hi] with 0 < lo <= hi < 0.5, or null")
        bad = sorted(set(self.gen_variants) - set(GEN_VARIANTS))
        check(not bad, "gen_variants", self.gen_variants, f"unknown {bad}; choose from {list(GEN_VARIANTS)}")
        bad = sorted(set(self.clip_variants) - set(CLIP_VARIANTS))
        check(not bad, "clip_variants", self.clip_variants, f"unknown {bad}; choose from {list(CLIP_VARIANTS)}")
        check(self.pairs_adapter in GEN_VARIANTS[1:], "pairs_adapter", self.pairs_adapter,
              f"one of {list(GEN_VARIANTS[1:])}")
        for key, cls in _extra_targets().items():
            setattr(self, key, check_mapping(cls, getattr(self, key), key))
        owned = sorted(set(self.eval_extra) & {"control_prompt", "prompt_template", "prompts", "split", "clips"})
        check(not owned, "eval_extra", self.eval_extra, f"{owned} are set by the study (prompts: prompt_word, "
              "prompt_irrelevant; the scans' reports are the report prompt)")


def _extra_targets() -> dict[str, type]:
    """The config class each ``*_extra`` section overrides."""
    from negdpo.generator.config import GenTrainConfig
    from negdpo.preference.clip.config import ClipTrainConfig
    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.segmentation.evaluate import EvalConfig
    from negdpo.segmentation.prompt_generator.train import SegTrainConfig
    from negdpo.segmentation.sam_pretrain import SamPretrainConfig
    from negdpo.segmentation.vlm_train import VlmTrainConfig

    return {"gen_extra": GenTrainConfig, "pairs_extra": BuildConfig, "clip_extra": ClipTrainConfig,
            "eval_extra": EvalConfig, "eval_reference_extra": EvalConfig, "pg_extra": SegTrainConfig, "vlm_extra": VlmTrainConfig,
            "sam_pretrain_extra": SamPretrainConfig}


# -- stage bookkeeping -----------------------------------------------------------------------------
def _stamp_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_result(work: Path, name: str, settings: dict) -> dict | None:
    """The stage's stored result if ``stage.json`` says it ran with these settings, else None."""
    stamp = work / name / "stage.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("key") == _stamp_key(settings):
            return info["result"]
    return None


def run_stage(work: Path, name: str, settings: dict, fn: Callable[[Path], dict]) -> dict:
    """Run ``fn(stage_dir)`` unless ``stage.json`` says it already ran with the same settings."""
    stage_dir = work / name
    stamp = stage_dir / "stage.json"
    key = _stamp_key(settings)
    cached = cached_result(work, name, settings)
    if cached is not None:
        logger.info("stage %s: cached", name)
        return cached
    if stamp.exists():
        logger.info("stage %s: settings changed, rerunning from scratch", name)
        shutil.rmtree(stage_dir)  # never resume another setting's checkpoints
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = fn(stage_dir)
    info = {"key": key, "settings": settings, "result": result, "seconds": round(time.perf_counter() - t0, 1),
            "pid": os.getpid()}
    tmp = stamp.with_name(".stage.json.tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(stamp)
    print(f"[study] {name}: done in {info['seconds']:.0f}s", flush=True)
    return result


# -- the study --------------------------------------------------------------------------------------
def run_study(cfg: StudyConfig) -> dict:
    from negdpo import study_eval as E
    from negdpo import study_tables as T
    from negdpo.core.config import code_version, seed_everything
    from negdpo.core.phantoms import ensure_phantoms
    from negdpo.core.stats import subject_ci

    gen_variants = [v for v in GEN_VARIANTS if v in cfg.gen_variants or v == "sft"]  # SFT = every DPO's reference
    clip_variants = [v for v in CLIP_VARIANTS if v in cfg.clip_variants or v == "base"]  # base = every fine-tune's start
    work, out = Path(cfg.work_dir), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    t_start, version = time.perf_counter(), code_version()  # before the run's own outputs make the tree dirty
    device = resolve_device(cfg.device)

    stage_seconds: dict[str, float] = {}  # as first computed (a cached stage reports its original run time)

    def stamped(settings: dict) -> dict:
        return {"preset": cfg.preset, **settings}  # no stage is shared between presets

    def stage(name: str, settings: dict, fn: Callable[[Path], dict]) -> dict:
        result = run_stage(work, name, stamped(settings), fn)
        stage_seconds[name] = json.loads((work / name / "stage.json").read_text())["seconds"]
        return result

    def stages(jobs: list[tuple[str, dict, Callable[[Path], dict]]]) -> list[dict]:
        """Independent stages: run in ``cfg.workers`` processes first (if > 1), then read in order."""
        prefetch_parallel(work, [(n, stamped(st), f) for n, st, f in jobs], cfg.workers, cfg.threads)
        return [stage(*job) for job in jobs]

    area = tuple(cfg.phantoms_lesion_area) if cfg.phantoms_lesion_area else None
    ph_settings = {"n": cfg.phantoms_n, "size": cfg.phantoms_size, "slices": cfg.phantoms_slices, "seed": cfg.seed,
                   "pretrain_n": cfg.phantoms_pretrain_n, "lesion_area": area}
    phantoms = Path(stage("phantoms", ph_settings, lambda d: {"path": str(ensure_phantoms(
        d / "data", n=cfg.phantoms_n, size=cfg.phantoms_size, seed=cfg.seed, slices=cfg.phantoms_slices,
        pretrain_n=cfg.phantoms_pretrain_n, lesion_area=area))})["path"])

    # 1. generator: (autoencoder adaptation), SFT, then DPO variants with the SFT adapter as reference
    gen_model = cfg.gen_model
    if cfg.gen_autoencoder_steps > 0:
        ae_set = {"phantoms": ph_settings, "model": cfg.gen_model, "steps": cfg.gen_autoencoder_steps,
                  "lr": cfg.gen_autoencoder_lr, "seed": cfg.seed}

        def adapt(d: Path) -> dict:
            from negdpo.generator.autoencoder import adapt_autoencoder

            return {"model": adapt_autoencoder(cfg.gen_model, str(phantoms), str(d / "model"),
                                               steps=cfg.gen_autoencoder_steps, lr=cfg.gen_autoencoder_lr,
                                               seed=cfg.seed, device=device)}

        gen_model = stage("gen_autoencoder", ae_set, adapt)["model"]
    cfg = replace(cfg, gen_model=gen_model)
    common = {"phantoms": ph_settings, "model": stamp_of(work, "gen_autoencoder") or cfg.gen_model,
              "seed": cfg.seed, "lr": cfg.gen_lr, "batch": cfg.gen_batch, "extra": cfg.gen_extra}
    adapters: dict[str, str] = {}
    adapters["sft"] = stage("gen_sft", common | {"steps": cfg.gen_sft_steps}, lambda d: train_generator(
        cfg, phantoms, d, train_method="sft", max_train_steps=cfg.gen_sft_steps, mi_weight=0.0,
        fidelity_weight=0.0, sdpo=False))["adapter"]
    dpo_variants = {"dpo": dict(mi_weight=0.0, fidelity_weight=0.0, sdpo=False),
                    "dpo_mi": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=False),
                    "dpo_mi_sdpo": dict(mi_weight=cfg.gen_mi_weight, fidelity_weight=cfg.gen_fidelity_weight, sdpo=True)}
    for name, extra in dpo_variants.items():
        if name not in gen_variants and name != cfg.pairs_adapter:
            continue
        settings = common | {"reference": stamp_of(work, "gen_sft"), "variant": name, "steps": cfg.gen_dpo_steps,
                             "beta": cfg.gen_beta, "mu": cfg.gen_sdpo_mu, **extra}
        adapters[name] = stage(f"gen_{name}", settings, lambda d, extra=extra: train_generator(
            cfg, phantoms, d, train_method="dpo", max_train_steps=cfg.gen_dpo_steps,
            reference_adapter=adapters["sft"], **extra))["adapter"]

    # 2. generator table on held-out positives (learned generators with and without paste-back)
    scans = E.held_out_positives(phantoms)
    detector, pool, judges = None, [], None  # the frozen judges: fitted on the pre-training pool only
    if cfg.judges and cfg.phantoms_pretrain_n > 0:
        from negdpo.generator.frozen_judges import LesionDetector

        judges = stage("frozen_judges", {"phantoms": ph_settings, "seed": cfg.seed},
                       lambda d: E.fit_lesion_detector(phantoms, d, cfg.seed))
        detector, pool = LesionDetector.load(judges["path"]), E.pool_positives(phantoms, cfg.judge_pool_max)
    gen_rows: list[dict] = []
    realism: list[dict] = []
    sampling = {"init": cfg.gen_init, "strength": cfg.gen_strength}
    evals = [(v, v, sampling if v in GEN_VARIANTS else None) for v in ("identity", "harmonic", *gen_variants)]
    if cfg.gen_strength < 1:  # the pairs' generator from pure noise too: what the model does without a start image
        evals.append((f"{cfg.pairs_adapter}_noise", cfg.pairs_adapter, {"init": "source", "strength": 1.0}))
    for name, variant, how in evals:
        settings = {"variant": variant, "adapter_stamp": stamp_of(work, f"gen_{variant}"), "phantoms": ph_settings,
                    "steps": cfg.gen_sample_steps, "seam_px": cfg.gen_seam_px, "seed": cfg.seed, "sampling": how,
                    "judges": judges and stamp_of(work, "frozen_judges"), "pool": [s.name for s in pool]}
        res = stage(f"geneval_{name}", settings, lambda d, n=name, v=variant, how=how: E.score_generator(
            n, scans, d, model=cfg.gen_model, adapter=adapters.get(v), device=device, steps=cfg.gen_sample_steps,
            seed=cfg.seed, seam_px=cfg.gen_seam_px, sampling=how, detector=detector, pool_scans=pool,
            n_boot=cfg.bootstrap))
        gen_rows += res["rows"]
        realism += res.get("realism", [])
        if how is not None:
            shutil.copy(res["grid"], out / "figures" / f"generator_{name}.png")

    # 3. base CLIPs (one per seed): contrastive pre-training on the pre-training pool
    seeds = [cfg.seed + k for k in range(cfg.clip_seeds)]
    pretrain_split = "pretrain" if cfg.phantoms_pretrain_n > 0 else "train"
    base_set = {"phantoms": ph_settings, "model": cfg.clip_model, "batch": cfg.clip_batch, "extra": cfg.clip_extra,
                "steps": cfg.clip_pretrain_steps, "lr": cfg.clip_pretrain_lr, "split": pretrain_split}
    ckpts: dict[tuple[str, int], str] = {}
    base_jobs = [(f"clip_base_s{sd}", base_set | {"seed": sd}, partial(
        clip_job, cfg, cfg.clip_model, str(phantoms), "clip", cfg.clip_pretrain_steps, cfg.clip_pretrain_lr, sd,
        dict(retention_weight=1.0, dedup_captions=True, freeze_logit_scale=False, tsne=False,
             train_split=pretrain_split))) for sd in seeds]
    for sd, job in zip(seeds, stages(base_jobs)):
        ckpts["base", sd] = job["checkpoint"]

    # 4. preference pairs from the chosen generator variant, judged with the first seed's base CLIP
    judge = f"local-dir:{ckpts['base', seeds[0]]}"
    pairs_set = {"adapter_stamp": stamp_of(work, f"gen_{cfg.pairs_adapter}"), "k": cfg.pairs_k, "extra": cfg.pairs_extra,
                 "steps": cfg.pairs_steps, "phantoms": ph_settings, "clip": stamp_of(work, f"clip_base_s{seeds[0]}"),
                 "sampling": sampling}

    def build_pairs(d: Path) -> dict:
        from negdpo.preference.pairs.build import BuildConfig, run_build

        summary = run_build(BuildConfig(data=str(phantoms), out=str(d / "pairs"), generator=cfg.gen_model,
                                        adapter=adapters[cfg.pairs_adapter], k=cfg.pairs_k, steps=cfg.pairs_steps,
                                        seed=cfg.seed, clip=judge, device=cfg.device,
                                        **(sampling | cfg.pairs_extra)))
        keep = ("rows", "dropped", "seconds", "judge", "scans_per_s", "report")
        return {"path": str(d / "pairs"), "summary": json.loads(json.dumps(
            {k: summary.get(k) for k in keep}, default=str))}

    pairs = stage("pairs", pairs_set, build_pairs)
    harmonic = None
    if "dpo_harmonic" in clip_variants:  # the no-generator control: harmonic fills as the rejected images
        harmonic = stage("harmonic_pairs", {"phantoms": ph_settings, "dilation": E.GEN_REPAINT_DILATION},
                         lambda d: {"path": str(E.write_harmonic_set(phantoms, d / "data"))})["path"]

    # 5. fine-tunes of each seed's base
    finetunes = {"dhn_nce": (str(phantoms), "dhn_nce", {"tsne": False}),
                 "dpo_gen": (pairs["path"], "dpo", {"tsne": True}),
                 "dpo_twin": (str(phantoms), "dpo", {"tsne": True}),
                 "dpo_harmonic": (harmonic, "dpo", {"tsne": False}),
                 "dpo_entropy": (pairs["path"], "dpo+entropy", {"tsne": False}),
                 "stages": (pairs["path"], "stages", {"tsne": True})}
    ft_jobs, ft_keys = [], []
    for name, (data, loss, extra) in finetunes.items():
        if name not in clip_variants:
            continue
        for sd in seeds:
            settings = {"base": stamp_of(work, f"clip_base_s{sd}"), "seed": sd, "variant": name, "loss": loss,
                        "data": Path(data).name, "pairs": pairs_set if data == pairs["path"] else None,
                        "harmonic": stamp_of(work, "harmonic_pairs") if data == harmonic else None,
                        "steps": cfg.clip_finetune_steps, "lr": cfg.clip_finetune_lr, "batch": cfg.clip_batch,
                        "extra": cfg.clip_extra}
            ft_jobs.append((f"clip_{name}_s{sd}", settings, partial(
                clip_job, cfg, f"local-dir:{ckpts['base', sd]}", data, loss, cfg.clip_finetune_steps,
                cfg.clip_finetune_lr, sd, extra)))
            ft_keys.append((name, sd))
    for key, job in zip(ft_keys, stages(ft_jobs)):
        ckpts[key] = job["checkpoint"]

    # 5b. the tiny SAM pre-trained as a promptable segmenter on the pool: the SAM of the chain (eval_sam: tiny),
    # of the oracle-box row and of the prompt-generator rows
    sam_ckpt, sam_info = cfg.eval_extra.get("sam_checkpoint"), None
    if cfg.sam_pretrain_steps > 0:
        from negdpo.study_stages import pretrain_sam_on_pool

        sam_info = stage("sam_pretrain", {"phantoms": ph_settings, "steps": cfg.sam_pretrain_steps, "seed": cfg.seed,
                                          "extra": cfg.sam_pretrain_extra}, lambda d: pretrain_sam_on_pool(
            phantoms, d, steps=cfg.sam_pretrain_steps, seed=cfg.seed, extra=cfg.sam_pretrain_extra))
        sam_ckpt = sam_info["checkpoint"]

    # 6. zero-shot segmentation of the test subjects: report + irrelevant prompt, then the one-word prompt
    clips = {f"{v}.s{sd}": f"local-dir:{p}" for (v, sd), p in ckpts.items()}
    eval_set = {"clips": {f"{v}.s{sd}": stamp_of(work, f"clip_{v}_s{sd}") for v, sd in ckpts},
                "saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "extra": cfg.eval_extra, "phantoms": ph_settings,
                "irrelevant": cfg.prompt_irrelevant, "sam_stamp": stamp_of(work, "sam_pretrain")}

    eval_options = {"split": "test", "saliency": cfg.eval_saliency, "sam": cfg.eval_sam, "seed": cfg.seed,
                    "device": cfg.device, "bootstrap": 200, "control_prompt": cfg.prompt_irrelevant} | cfg.eval_extra
    eval_options.pop("overwrite_output_dir", None)
    if sam_ckpt:
        eval_options["sam_checkpoint"] = sam_ckpt

    from negdpo.segmentation.evaluate import evaluate

    def run_eval(d: Path, word: bool) -> dict:
        options = dict(eval_options)
        if word:
            options |= {"prompt_template": cfg.prompt_word, "control_prompt": None, "save_images": False}
        res = evaluate(str(phantoms), clips, str(d / "eval"), overwrite_output_dir=True,
                       **options)  # the stage owns d: a rerun replaces its evaluation
        return {"rows": json_rows(res.rows), "report": str(d / "eval" / "report.md")}

    seg = stage("evaluate", eval_set, lambda d: run_eval(d, False))
    seg_word = stage("evaluate_word", eval_set | {"word": cfg.prompt_word}, lambda d: run_eval(d, True))
    ref_rows: list[dict] = []
    if cfg.eval_reference_saliency:  # the same base chain through another saliency (MedCLIP-SAMv2's M2IB, say)
        ref = {"saliency": cfg.eval_reference_saliency} | cfg.eval_reference_extra
        ref_clips = {f"base_reference.s{sd}": clips[f"base.s{sd}"] for sd in seeds}
        ref_rows = stage("evaluate_reference", eval_set | {"reference": ref}, lambda d: {"rows": json_rows(evaluate(
            str(phantoms), ref_clips, str(d / "eval"), overwrite_output_dir=True, **(eval_options | ref)).rows)})["rows"]
    oracle = None
    oracle_sam = cfg.eval_sam if cfg.eval_sam != "none" else ("tiny" if cfg.sam_pretrain_steps > 0 else None)
    if oracle_sam:
        oracle = stage("oracle_box", {"sam": oracle_sam, "checkpoint": sam_ckpt, "phantoms": ph_settings,
                                      "sam_stamp": stamp_of(work, "sam_pretrain")},
                       lambda d: {"rows": E.oracle_box(phantoms, "test", oracle_sam, sam_ckpt, device)})

    # 7. the results contract, figures, results.md
    T.plot_curves({v: Path(adapters[v]) / "metrics.jsonl" for v in gen_variants},
                out / "figures" / "generator_curves.png", ("loss", "implicit_acc"),
                "Generator training (SFT: denoising loss; DPO variants: Diffusion-DPO)")
    T.plot_curves({v: Path(ckpts[v, seeds[0]]).parent / "metrics.jsonl" for v in clip_variants},
                out / "figures" / "clip_curves.png", ("loss", "rewards/accuracies"), f"CLIP training (seed {seeds[0]})")
    for name in ("dpo_gen", "dpo_twin", "stages"):
        if (name, seeds[0]) in ckpts:
            for tsne in Path(ckpts[name, seeds[0]]).parent.glob("tsne*.png"):
                shutil.copy(tsne, out / "figures" / f"tsne_{name}.png")
    long_rows = E.long_segmentation_rows(seg["rows"] + ref_rows, seg_word["rows"], E.lesion_groups(phantoms))
    # 6b. stage 2 (prompt generator on pseudo-labels / ground truth) and VL-SAM, on the first seed's chains
    from negdpo.study_stages import run_stage2_rows

    extra_rows, stage2 = run_stage2_rows(cfg, stage, work, phantoms, ckpts, seeds[0], eval_options, ph_settings,
                                         pretrain_split)
    long_rows += extra_rows
    extra_cmp = T.stage2_comparisons(cfg.pg_best_variant)
    oracle_stat = subject_ci(T.by_subject(oracle["rows"] if oracle else [], "dice"), cfg.bootstrap, cfg.seed)
    results = {"preset": cfg.preset, "code_version": version,
               "n_test_positive": len({r["image"] for r in long_rows}),
               "oracle_box_dice": T.num(oracle_stat[0]), "oracle_box_dice_ci": [T.num(oracle_stat[1]),
                                                                                 T.num(oracle_stat[2])],
               "segmentation": T.segmentation_rows(long_rows, cfg.bootstrap, cfg.seed),
               "comparisons": (T.comparisons(long_rows, cfg.bootstrap, cfg.seed, "dice", extra_cmp)
                               + T.comparisons(long_rows, cfg.bootstrap, cfg.seed, "prompt_gap", extra_cmp)),
               "stage2": stage2, "sam_pretrain": sam_info, "oracle_sam": oracle_sam,
               "generator": T.generator_rows(gen_rows, cfg.bootstrap, cfg.seed, judged=judges is not None),
               "twin_outside_mi": T.twin_outside_mi(gen_rows, cfg.bootstrap, cfg.seed),
               "realism_auc": {r["method"] + ("_no_paste" if r["paste_back"] is False else ""): r["auc"]
                               for r in realism}, "realism": realism,
               "lesion_detector": judges and {k: judges[k] for k in ("info", "held_out_accuracy")},
               "seeds": seeds, "clip_pretrain_split": pretrain_split, "pairs": pairs["summary"],
               "stage_seconds": stage_seconds, "config": asdict(cfg)}
    T.write_csv(out / "generator_metrics.csv", gen_rows)
    T.write_csv(out / "segmentation_metrics.csv", long_rows)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    (out / "results.md").write_text(T.render_markdown(results, figures, time.perf_counter() - t_start))
    print(f"[study] results: {out / 'results.md'}", flush=True)
    return results


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
