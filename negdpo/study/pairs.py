"""The study's CLIP training sets beyond the phantoms: the preference pairs of the chosen generator (judged
with the first seed's base CLIP) and the harmonic-fill set of the no-generator control."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from negdpo.study.cache import StudyRun
from negdpo.study.data import GEN_REPAINT_DILATION, write_harmonic_set, write_healthy_set

PAIR_SPLITS = "train,val"  # the fine-tunes train on train and validate on val; the test split is never paired


@dataclass
class PairSets:
    """The pair folders (None: not built) and the stage settings the fine-tunes' keys name."""

    pairs: dict  # the pairs stage's result: path + summary
    settings: dict
    harmonic: str | None = None
    faithful: str | None = None
    twinfree: str | None = None  # pairs of the twin-free generator (negdpo.study.twinfree.build_twinfree_pairs)


def build_pairs(run: StudyRun, adapters: dict[str, str], judge_clip: str, judge_stamp: str | None,
                harmonic: bool, faithful: bool = False) -> PairSets:
    """Stages ``pairs`` (``negdpo build-pairs`` with the ``pairs_adapter`` generator, judged by ``judge_clip``),
    if ``harmonic`` ``harmonic_pairs`` (harmonic fills as the rejected images), and if ``faithful``
    ``faithful_pairs`` (positives and ordinary healthy scans: MedCLIP-SAMv2's DHN-NCE data)."""
    cfg, phantoms = run.cfg, run.phantoms
    settings = {"adapter_stamp": run.stamp(f"gen_{cfg.pairs_adapter}"), "k": cfg.pairs_k, "extra": cfg.pairs_extra,
                "steps": cfg.pairs_steps, "phantoms": run.ph_settings, "clip": judge_stamp, "sampling": run.sampling,
                "splits": PAIR_SPLITS}

    def build(d: Path) -> dict:
        from negdpo.preference.pairs.build import BuildConfig, run_build

        summary = run_build(BuildConfig(data=str(phantoms), out=str(d / "pairs"), generator=cfg.gen_model,
                                        adapter=adapters[cfg.pairs_adapter], k=cfg.pairs_k, steps=cfg.pairs_steps,
                                        seed=cfg.seed, clip=f"local-dir:{judge_clip}", device=cfg.device,
                                        **(run.sampling | {"splits": PAIR_SPLITS} | cfg.pairs_extra)))
        keep = ("rows", "dropped", "seconds", "judge", "scans_per_s", "report")
        return {"path": str(d / "pairs"), "summary": json.loads(json.dumps(
            {k: summary.get(k) for k in keep}, default=str))}

    sets = PairSets(pairs=run.stage("pairs", settings, build), settings=settings)
    if harmonic:
        sets.harmonic = run.stage("harmonic_pairs", {"phantoms": run.ph_settings, "dilation": GEN_REPAINT_DILATION},
                                  lambda d: {"path": str(write_harmonic_set(phantoms, d / "data"))})["path"]
    if faithful:
        sets.faithful = run.stage("faithful_pairs", {"phantoms": run.ph_settings},
                                  lambda d: {"path": str(write_healthy_set(phantoms, d / "data"))})["path"]
    return sets
