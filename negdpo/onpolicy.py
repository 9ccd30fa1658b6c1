"""The generator without twins: self-supervised SFT and on-policy, judge-ranked Diffusion-DPO rounds.

    accelerate launch gen_train.py --train_method sft --sft_source healthy --output_dir OUT/sft
    accelerate launch gen_train.py --train_method onpolicy --reference_adapter OUT/sft --rounds 2 --candidates 4 \\
        --output_dir OUT/onpolicy

For the study, one function per step: :func:`train_sft_healthy` (returns the adapter folder) and
:func:`run_onpolicy` (returns the adapter folder of every round). Round r (docs/method.md#on-policy-rounds):

1. sample ``candidates`` fills per training positive with the current policy (round r-1's adapter; round 1:
   ``reference_adapter``, else the base model) inside the dilated lesion mask, pasted back;
2. score them with the training judges (:mod:`negdpo.preference.pairs.train_judges`: fitted on the training
   split, never on twins, validation/test scans or the frozen evaluation judges);
3. pairs: chosen = the best candidate, rejected = the worst one or the positive itself (``onpolicy_rejected``),
   written as a Hub-style dataset (``pairs/data/generator/*.parquet`` + ``pairs/generator`` save_to_disk);
4. Diffusion-DPO (SDPO / masked MI / fidelity as configured) with the round r-1 policy as the reference.

Layout and resume: ``OUT/round_<r>/candidates/chunk_<i>.npz`` (one per ``sample_batch`` positives),
``OUT/round_<r>/pairs/`` (renamed into place when complete), ``OUT/round_<r>/train/`` (a gen_train run,
checkpoints included) and ``OUT/round_<r>/round.json`` (the round's stamp). Every file is written to a
temporary name and renamed, so after a kill at any point the same command with ``--resume_from_checkpoint
latest`` redoes only what has no stamp. ``OUT/onpolicy.json`` holds the settings; resuming with other ones is
refused. Nothing under ``<split>_twins/`` is read. The rounds run in one process (a multi-process launch is
refused); each round's DPO is an ordinary :func:`negdpo.generator.train.train` run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("negdpo.onpolicy")
_RUN_CONTROL = ("output_dir", "run_name", "overwrite_output_dir", "resume_from_checkpoint", "torch_threads",
                "report_to", "tracker_name", "logging_steps", "checkpointing_steps", "checkpoints_total_limit",
                "validation_steps", "num_validation_images", "progress_bar")


def train_sft_healthy(cfg: Any) -> str:
    """Self-supervised SFT on healthy tissue (``sft_source=healthy``); returns the adapter folder."""
    from negdpo.generator.train import train

    cfg = dataclasses.replace(cfg, train_method="sft", sft_source="healthy")
    summary = train(cfg)
    return str(Path(summary["output_dir"]))


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def settings_of(cfg: Any) -> dict:
    """The config fields that shape the rounds' results (run control such as resume or logging left out)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_CONTROL}


@dataclasses.dataclass
class TrainingData:
    """What the rounds may look at: training scans (no twins), the positives to repair, the mask bank."""

    scans: list
    positives: list
    negatives: list[tuple[str, np.ndarray]]
    bank: list[np.ndarray]

    @classmethod
    def read(cls, cfg: Any) -> TrainingData:
        from negdpo.core.imageio import read_scan, stem_of
        from negdpo.core.scans import ScanFolder
        from negdpo.generator.selfsup import lesion_mask_bank

        folder = ScanFolder(cfg.dataset_name, on_error="skip", read_twins=False)
        scans = folder.load_split(cfg.train_split)
        positives = [s for s in scans if s.positive][: cfg.max_train_pairs]
        if not positives:
            raise ValueError(f"{cfg.dataset_name}: no positive scans (non-empty masks) in split '{cfg.train_split}'")
        have = {stem_of(Path(s.name)) for s in scans}
        negatives = [(p.name, read_scan(p, window=folder.window)) for p in folder.negatives() if stem_of(p) not in have]
        return cls(scans, positives, negatives, lesion_mask_bank(cfg.dataset_name, cfg.train_split))


def repaint_mask(lesion: np.ndarray, dilate: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(lesion, iterations=dilate) if dilate > 0 else np.asarray(lesion, bool)


def sample_round(cfg: Any, data: TrainingData, rdir: Path, r: int, policy: str | None) -> list[np.ndarray]:
    """K candidates per positive (array (K, H, W[, 3]) each), chunk by chunk; finished chunks are kept."""
    from negdpo.core.config import derive_seed, resolve_device
    from negdpo.core.faults import fault_point
    from negdpo.generator.sample import inpaint, load_generator

    cdir = rdir / "candidates"
    cdir.mkdir(parents=True, exist_ok=True)
    k, n = cfg.candidates, len(data.positives)
    pipe = None
    out: list[np.ndarray] = []
    for ci, start in enumerate(range(0, n, cfg.sample_batch)):
        chunk = data.positives[start:start + cfg.sample_batch]
        path = cdir / f"chunk_{ci:04d}.npz"
        if not path.is_file():
            if pipe is None:
                pipe = load_generator(cfg.pretrained_model_name_or_path, policy, device=resolve_device("auto"))
            seeds = [derive_seed("onpolicy", s.name, r, j, base=cfg.seed) for s in chunk for j in range(k)]  # as rows
            flat = inpaint(pipe, [s.image for s in chunk for _ in range(k)],
                           [repaint_mask(s.mask, cfg.repaint_dilate) for s in chunk for _ in range(k)],
                           [s.prompt or "" for s in chunk for _ in range(k)], seeds, steps=cfg.sample_steps,
                           strength=cfg.sample_strength, init=cfg.sample_init, size=cfg.resolution or None,
                           batch_size=len(seeds))
            _atomic_npz(path, {f"c{i}": np.stack(flat[i * k:(i + 1) * k]) for i in range(len(chunk))}
                        | {"names": np.asarray([s.name for s in chunk])})
            fault_point(f"onpolicy_sampled_r{r}", ci)
        with np.load(path, allow_pickle=False) as z:
            if [str(x) for x in z["names"]] != [s.name for s in chunk]:
                raise RuntimeError(f"{path}: holds other positives than this run's; remove {rdir} to resample")
            out += [np.asarray(z[f"c{i}"], np.float32) for i in range(len(chunk))]
    return out


def _judges(cfg: Any, data: TrainingData, out: Path, candidates: list[np.ndarray]):
    from negdpo.generator.config import parse_judge_weights
    from negdpo.preference.pairs.train_judges import (
        RealismJudge,
        Region,
        ResidualLesionJudge,
        TrainingJudges,
        healthy_regions,
    )

    weights = parse_judge_weights(cfg.judge_weights)
    healthy = healthy_regions(data.scans, data.negatives, data.bank, per_scan=2, seed=cfg.seed,
                              margin=cfg.selfsup_margin)
    lesion = realism = None
    if weights.get("lesion", 0) > 0:
        jdir = out / "judges"
        if (jdir / "lesion.json").is_file():
            lesion = ResidualLesionJudge.load(jdir)
        else:
            lesion = ResidualLesionJudge.fit(data.scans, healthy, seed=cfg.seed, split=cfg.train_split)
            tmp = out / ".judges.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            lesion.save(tmp)
            os.replace(tmp, jdir)
    if weights.get("realism", 0) > 0:
        fake = [Region(c, s.mask) for s, cands in zip(data.positives, candidates) for c in cands]
        realism = RealismJudge.fit(healthy, fake, seed=cfg.seed)
    return TrainingJudges(weights, lesion, realism)


def build_round_pairs(cfg: Any, data: TrainingData, out: Path, rdir: Path, r: int,
                      candidates: list[np.ndarray], policy: str | None = None) -> dict:
    """Judge the candidates, write the round's pair dataset (renamed into place) and return its summary."""
    import datasets

    from negdpo.core.config import code_version, derive_seed
    from negdpo.core.faults import fault_point
    from negdpo.core.imageio import to_uint8
    from negdpo.preference.pairs.generate import adapter_sha
    from negdpo.preference.pairs.schema import difficulty_of, features_for

    judges = _judges(cfg, data, out, candidates)
    sha = adapter_sha(policy)
    rows, report = [], []
    for s, cands in zip(data.positives, candidates):
        rmask = repaint_mask(s.mask, cfg.repaint_dilate)
        scores, parts = judges(s.image, s.mask, rmask, list(cands))
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        seeds = [derive_seed("onpolicy", s.name, r, j, base=cfg.seed) for j in range(len(cands))]
        if cfg.onpolicy_rejected == "source":
            rejected, s_rej, j_rej, seed_rej = s.image, float("nan"), {}, -1
        else:
            rejected, s_rej, j_rej, seed_rej = cands[worst], float(scores[worst]), parts[worst], seeds[worst]
        margin = float(scores[best] - s_rej) if np.isfinite(s_rej) else 1.0
        diff, bucket = difficulty_of(max(margin, 0.0))
        rows.append({
            "pair_id": f"{cfg.train_split}/{Path(s.name).stem}#onpolicy:r{r}", "prompt": s.prompt or "",
            "source": to_uint8(s.image), "mask": to_uint8(rmask), "chosen": to_uint8(cands[best]),
            "rejected": to_uint8(rejected), "score_chosen": float(scores[best]), "score_rejected": s_rej,
            "difficulty": diff, "difficulty_bucket": bucket, "judge_chosen": json.dumps(parts[best]),
            "judge_rejected": json.dumps(j_rej), "subject_id": Path(s.name).stem.rsplit("_", 1)[0], "split": "train",
            "modality": Path(s.name).stem.split("_", 1)[0], "file": f"{cfg.train_split}_images/{s.name}",
            "gen_model": cfg.pretrained_model_name_or_path, "gen_adapter_sha": sha, "scheduler": "pipeline default",
            "steps": cfg.sample_steps, "guidance": 1.0, "strength": cfg.sample_strength, "seed_chosen": seeds[best],
            "seed_rejected": seed_rej, "label_source": judges.spec, "code_version": code_version(), "kind": "generator"})
        report.append({"name": s.name, "scores": [round(float(x), 6) for x in scores], "best": best, "worst": worst})
    feats = features_for("generator")
    ds = datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in feats}, features=feats)
    final, tmp = rdir / "pairs", rdir / ".pairs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data" / "generator").mkdir(parents=True)
    ds.to_parquet(str(tmp / "data" / "generator" / "train-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp / "generator"))
    (tmp / "README.md").write_text(
        "---\nconfigs:\n- config_name: generator\n  data_files:\n  - split: train\n"
        "    path: data/generator/train-*.parquet\n---\n"
        f"# On-policy pairs, round {r}\n\nJudges: `{judges.spec}`; rejected = {cfg.onpolicy_rejected}.\n")
    summary = {"round": r, "n_pairs": len(rows), "judges": judges.spec, "rejected": cfg.onpolicy_rejected,
               "mean_score_chosen": float(np.mean([row["score_chosen"] for row in rows])),
               "mean_score_rejected": float(np.nanmean([row["score_rejected"] for row in rows]))
               if cfg.onpolicy_rejected == "worst" else None}
    _atomic_json(tmp / "judging.json", {**summary, "candidates": report})
    os.replace(tmp, final)
    fault_point("onpolicy_pairs", r)
    return summary


def train_round(cfg: Any, rdir: Path, r: int, policy: str | None) -> str:
    """Diffusion-DPO on the round's pairs with the previous policy as reference; returns the adapter folder."""
    from negdpo.generator.train import train

    tdir = rdir / "train"
    if not (tdir / "summary.json").is_file():
        rcfg = dataclasses.replace(cfg, train_method="dpo", dataset_name=str(rdir / "pairs"), output_dir=str(tdir),
                                   run_name=f"{cfg.run_name}_round{r}", reference_adapter=policy,
                                   reference_mode="fuse", reference="disable_adapters",
                                   resume_from_checkpoint="latest", overwrite_output_dir=False)
        train(rcfg)
    return str(tdir)


def run_onpolicy(cfg: Any) -> list[str]:
    """R on-policy rounds (see the module doc); returns the adapter folder of every round, in order."""
    from negdpo.core.outdir import output_dir
    from negdpo.core.training import output_path

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("the on-policy rounds run in one process (launch gen_train.py without several processes)")
    out = output_path(cfg, "generator")
    settings = settings_of(cfg)
    adapters: list[str] = []
    with output_dir(out, "gen_train_onpolicy", overwrite=cfg.overwrite_output_dir,
                    resume=bool(cfg.resume_from_checkpoint), settings=settings):
        stamp = out / "onpolicy.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(f"{out}: holds on-policy rounds made with other settings ({stamp}); use another "
                             "--output_dir or --overwrite_output_dir")
        _atomic_json(stamp, {"settings": settings})
        data = None
        policy = cfg.reference_adapter
        for r in range(1, cfg.rounds + 1):
            rdir = out / f"round_{r:02d}"
            done = rdir / "round.json"
            if done.is_file():
                policy = str(rdir / "train")
                adapters.append(policy)
                continue
            rdir.mkdir(parents=True, exist_ok=True)
            if not (rdir / "pairs").is_dir():
                data = data or TrainingData.read(cfg)
                candidates = sample_round(cfg, data, rdir, r, policy)
                build_round_pairs(cfg, data, out, rdir, r, candidates, policy)
            pairs = json.loads((rdir / "pairs" / "judging.json").read_text())
            adapter = train_round(cfg, rdir, r, policy)
            _atomic_json(done, {"round": r, "adapter": adapter, "policy": policy,
                                **{k: v for k, v in pairs.items() if k != "candidates"}})
            logger.info("round %d/%d: %d pairs, mean judge score chosen %.3f; adapter %s", r, cfg.rounds,
                        pairs["n_pairs"], pairs["mean_score_chosen"], adapter)
            policy = adapter
            adapters.append(adapter)
        _atomic_json(out / "summary.json", {"rounds": cfg.rounds, "adapters": adapters, "output_dir": str(out)})
    return adapters
