"""The study's twin-free chain (issue 23; docs/method.md#the-twin-free-generator): the generator a user with real
scans trains, and the CLIP pairs it makes, with nothing read from a ``*_twins/`` folder.

    autoencoder adapted without twins (stage ``gen_autoencoder_twinfree``)
    -> self-supervised SFT on healthy tissue, per generator seed (``gen_sft_healthy<sfx>``)
    -> on-policy Diffusion-DPO rounds judged by the training judges, without / with the masked-MI regulariser
       (``gen_dpo_onpolicy<sfx>``, ``gen_dpo_onpolicy_mi<sfx>``: one stage per chain, every round inside)
    -> (generator table, as every row) -> pairs of the last round's first-seed generator, judged without twins,
       on a copy of the phantoms without their twins (``twinfree_pairs``)

The training stages run in the phase ``twinfree`` with the ``val`` and ``test`` splits locked: they read the train
split and the pre-training pool only (``run.reads["twinfree"]`` counts the files per split).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from negdpo.study.cache import Job, StudyRun
from negdpo.study.generators import gen_suffix, train_generator
from negdpo.study.variants import TWINFREE_CHAINS, twinfree_rows

TWINFREE_LOCKED = ("val", "test")  # the twin-free training stages read train and the pool only
# build-pairs judges of the twin-free pairs: no twin judge, no CLIP judge (the base CLIP pre-trains on pool twins)
TWINFREE_PAIR_JUDGES = "contrast=1,mi_out=0.5,fidelity_out=0.5"


def twinfree_autoencoder(run: StudyRun, base: str) -> str:
    """Stage ``gen_autoencoder_twinfree``: ``base``'s VAE adapted on the train split's images and ``negatives/``
    (no twins), its held-out PSNR on the pool (never val/test); ``gen_autoencoder_steps`` 0: ``base`` itself."""
    cfg = run.cfg
    if cfg.gen_autoencoder_steps <= 0:
        return base
    heldout = ("pretrain",) if cfg.phantoms_pretrain_n > 0 else ()
    settings = {"phantoms": run.ph_settings, "model": base, "steps": cfg.gen_autoencoder_steps,
                "lr": cfg.gen_autoencoder_lr, "seed": cfg.seed, "twins": False, "heldout": list(heldout)}

    def adapt(d: Path) -> dict:
        from negdpo.generator.autoencoder import adapt_autoencoder as adapt_vae

        return {"model": adapt_vae(base, str(run.phantoms), str(d / "model"), steps=cfg.gen_autoencoder_steps,
                                   lr=cfg.gen_autoencoder_lr, seed=cfg.seed, device=run.device, twins=False,
                                   heldout_splits=heldout)}

    return run.stage("gen_autoencoder_twinfree", settings, adapt)["model"]


def _no_validation() -> dict:
    """Overrides that keep a generator run off the validation split (no held-out pairs, no validation grids)."""
    return dict(val_split="", eval_pairs=0, num_validation_images=0, validation_steps=0)


def train_twinfree(run: StudyRun, model: str, seed: int) -> dict[str, str]:
    """Stages ``gen_sft_healthy<sfx>``, ``gen_dpo_onpolicy<sfx>`` and ``gen_dpo_onpolicy_mi<sfx>`` of one generator
    seed, from the twin-free autoencoder ``model``. Returns {row: adapter folder}: ``sft_healthy`` and every
    round ``dpo_onpolicy[_mi]_r<r>``."""
    cfg, sfx = run.cfg, gen_suffix(run.cfg, seed)
    common = {"phantoms": run.ph_settings, "model": run.stamp("gen_autoencoder_twinfree") or model, "seed": seed,
              "lr": cfg.gen_lr, "batch": cfg.gen_batch, "extra": cfg.gen_extra}
    tf_cfg = _with_model(cfg, model)
    sft = run.stage(f"gen_sft_healthy{sfx}", common | {"steps": cfg.twinfree_sft_steps}, lambda d: train_generator(
        tf_cfg, run.phantoms, d, train_method="sft", sft_source="healthy", max_train_steps=cfg.twinfree_sft_steps,
        mi_weight=0.0, fidelity_weight=0.0, sdpo=False, seed=seed, **_no_validation()))["adapter"]
    adapters = {"sft_healthy": sft}
    for chain, mi in TWINFREE_CHAINS.items():
        extra = dict(mi_weight=cfg.gen_mi_weight if mi else 0.0, fidelity_weight=cfg.gen_fidelity_weight if mi else 0.0,
                     sdpo=False)
        settings = common | {"reference": run.stamp(f"gen_sft_healthy{sfx}"), "chain": chain,
                             "rounds": cfg.twinfree_rounds, "candidates": cfg.twinfree_candidates,
                             "steps": cfg.twinfree_dpo_steps, "sample_steps": cfg.pairs_steps, "beta": cfg.gen_beta,
                             "sampling": run.sampling, **extra}
        res = run.stage(f"gen_{chain}{sfx}", settings, lambda d, extra=extra: onpolicy_rounds(
            tf_cfg, run.phantoms, d, reference=sft, seed=seed, rounds=cfg.twinfree_rounds,
            candidates=cfg.twinfree_candidates, steps=cfg.twinfree_dpo_steps, sample_steps=cfg.pairs_steps,
            sampling=run.sampling, **extra))
        adapters |= {f"{chain}_r{r}": a for r, a in enumerate(res["adapters"], 1)}
    return adapters


def _with_model(cfg: Any, model: str) -> Any:
    return replace(cfg, gen_model=model)


def onpolicy_rounds(cfg: Any, phantoms: Path, out: Path, *, reference: str, seed: int, rounds: int, candidates: int,
                    steps: int, sample_steps: int, sampling: dict, **extra) -> dict:
    """The on-policy rounds (:func:`negdpo.onpolicy.run_onpolicy`) into ``out/run``; returns each round's adapter."""
    from negdpo.generator.train import GenTrainConfig
    from negdpo.onpolicy import run_onpolicy
    from negdpo.study.generators import _gen_config

    gcfg: GenTrainConfig = _gen_config(
        cfg, phantoms, out / "run", train_method="onpolicy", reference_adapter=reference, rounds=rounds,
        candidates=candidates, max_train_steps=steps, sample_steps=sample_steps,
        sample_init=sampling.get("init", "harmonic"), sample_strength=float(sampling.get("strength", 0.5)),
        seed=seed, **_no_validation(), **extra)
    adapters = run_onpolicy(gcfg)
    judged = [json.loads((Path(a).parent / "round.json").read_text()) for a in adapters]
    return {"adapters": adapters, "rounds": [{k: v for k, v in j.items() if not isinstance(v, (list, dict))}
                                             for j in judged]}


def train_twinfree_rows(run: StudyRun, seeds: list[int], base: str) -> tuple[dict[int, dict[str, str]], str]:
    """The whole twin-free training chain from the untrained ``base`` model, every generator seed, in the phase
    ``twinfree`` (val + test locked). Returns ({generator seed: {row: adapter}}, the twin-free autoencoder)."""
    with run.phase("twinfree", TWINFREE_LOCKED):
        model = twinfree_autoencoder(run, base)
        by_seed = {gs: train_twinfree(run, model, gs) for gs in seeds}
    missing = set(twinfree_rows(run.cfg.twinfree_rounds)) - set(by_seed[seeds[0]])
    if missing:
        raise RuntimeError(f"twin-free chain: no adapter for {sorted(missing)}")
    return by_seed, model


def twinfree_job(run: StudyRun, seeds: list[int], base: str) -> Job:
    """The whole twin-free training chain (:func:`train_twinfree_rows`) as one picklable job, so it can run beside
    the oracle generators: it depends on the phantoms and the untrained ``base`` only. Its stages are cached one by
    one; read it back with ``count=False``: :func:`train_twinfree_rows` then reads (and counts) them."""
    settings = {"seeds": seeds, "base": base, "cfg": asdict(run.cfg)}
    return ("twinfree_chain", settings, partial(_twinfree_chain, run, seeds, base))


def _twinfree_chain(run: StudyRun, seeds: list[int], base: str, d: Path) -> dict:
    # a private count: the caller counts the chain when it reads the stages back (train_twinfree_rows, count=True)
    own = replace(run, reads={}, stage_seconds={}, counted=set(), unrecorded=[], current_phase=None)
    train_twinfree_rows(own, seeds, base)
    return {}


def write_twinless_copy(phantoms: Path, out: Path, splits: tuple[str, ...]) -> Path:
    """``splits``' images and masks, ``prompts.json`` and ``meta.csv`` of a phantom folder, without any twin:
    build-pairs reads a folder's twins when they exist, so the twin-free pairs are built from this copy."""
    for split in splits:
        for kind in ("images", "masks"):
            src = phantoms / f"{split}_{kind}"
            if src.is_dir():
                shutil.copytree(src, out / f"{split}_{kind}", dirs_exist_ok=True)
    for name in ("prompts.json", "meta.csv"):
        if (phantoms / name).is_file():
            shutil.copy(phantoms / name, out / name)
    return out


def build_twinfree_pairs(run: StudyRun, model: str, adapter: str, adapter_row: str, splits: str) -> dict:
    """Stage ``twinfree_pairs``: ``negdpo build-pairs`` with the twin-free generator (``adapter``, from the twin-free
    autoencoder ``model``) on a twin-less copy of ``splits``, judged by :data:`TWINFREE_PAIR_JUDGES`."""
    cfg = run.cfg
    settings = {"adapter_stamp": run.stamp(f"gen_{adapter_row.rsplit('_r', 1)[0]}"), "row": adapter_row,
                "k": cfg.pairs_k, "extra": cfg.pairs_extra, "steps": cfg.pairs_steps, "phantoms": run.ph_settings,
                "judges": TWINFREE_PAIR_JUDGES, "sampling": run.sampling, "splits": splits}

    def build(d: Path) -> dict:
        from negdpo.preference.pairs.build import BuildConfig, run_build

        data = write_twinless_copy(run.phantoms, d / "data", tuple(splits.split(",")))
        opts = run.sampling | {"splits": splits} | cfg.pairs_extra | {"judges": TWINFREE_PAIR_JUDGES}
        summary = run_build(BuildConfig(data=str(data), out=str(d / "pairs"), generator=model, adapter=adapter,
                                        k=cfg.pairs_k, steps=cfg.pairs_steps, seed=cfg.seed, device=cfg.device,
                                        **opts))
        keep = ("rows", "dropped", "seconds", "judge", "scans_per_s", "report")
        return {"path": str(d / "pairs"), "summary": json.loads(json.dumps(
            {k: summary.get(k) for k in keep}, default=str))}

    return run.stage("twinfree_pairs", settings, build)
