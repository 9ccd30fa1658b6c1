"""The phantom study, reduced: every stage runs, numbers come from the data, reruns reproduce them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.stats import subject_ci

from negdpo.study import StudyConfig, load_study_config, run_study

ROOT = Path(__file__).resolve().parents[1]


def _reduced(tmp: Path) -> StudyConfig:
    cfg = load_study_config(str(ROOT / "configs" / "phantom_study.yaml"), "quick", [])
    return StudyConfig(**{**cfg.__dict__, "out": str(tmp / "results"), "work_dir": str(tmp / "work"),
                          "phantoms_n": 8, "gen_autoencoder_steps": min(cfg.gen_autoencoder_steps, 20),
                          "gen_sft_steps": 2, "gen_dpo_steps": 2, "gen_sample_steps": 2,
                          "gen_variants": ["sft", "dpo_mi_sdpo"], "pairs_k": 2, "pairs_steps": 2,
                          "clip_variants": ["base", "dpo_twin", "dpo_gen"], "clip_pretrain_steps": 2,
                          "clip_finetune_steps": 2, "clip_batch": 2, "bootstrap": 50,
                          "gen_extra": {**cfg.gen_extra, "eval_pairs": 4, "eval_draws": 1},
                          "clip_extra": {**cfg.clip_extra, "tsne": False, "eval_batch_size": 8},
                          "eval_extra": {**cfg.eval_extra, "m2ib_steps": 2, "m2ib_samples": 2}})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = _reduced(tmp)
    return cfg, run_study(cfg)


def test_results_written_with_both_tables(study):
    cfg, results = study
    md = (Path(cfg.out) / "results.md").read_text()
    for text in ("## Generator", "| positive itself (no repair) |", "| harmonic fill (classical) |", "| SFT only |",
                 "| DPO + MI + SDPO |", "## Zero-shot segmentation", "| base (contrastive pre-training) |",
                 "| CLIP-DPO, twin negatives (oracle) |", "| CLIP-DPO, generated negatives |", "seed 0"):
        assert text in md, text
    assert "| DPO + MI |" not in md  # variants that did not run are not reported
    figs = {p.name for p in (Path(cfg.out) / "figures").glob("*.png")}
    assert {"generator_sft.png", "generator_dpo_mi_sdpo.png", "generator_curves.png", "clip_curves.png"} <= figs
    assert set(results["segmentation"]) == {"base", "dpo_twin", "dpo_gen"}


def test_numbers_come_from_the_data(study):
    """The no-repair row equals |positive - twin| inside the lesion, recomputed here from the files."""
    from negdpo.core.imageio import read_mask, read_scan

    cfg, results = study
    root = Path(cfg.work_dir) / "phantoms" / "data"
    per_subject: dict[str, list[float]] = {}
    for split in ("val", "test"):
        for img in sorted((root / f"{split}_images").glob("*.png")):
            mask = read_mask(root / f"{split}_masks" / img.name)
            if mask.any():
                err = np.abs(read_scan(img) - read_scan(root / f"{split}_twins" / img.name))[mask].mean()
                per_subject.setdefault(img.stem.rsplit("_", 1)[0], []).append(float(err))
    mean, lo, hi = results["generator"]["identity"]["inside_err"]
    assert mean == pytest.approx(np.mean([np.mean(v) for v in per_subject.values()]), rel=1e-6)
    assert lo <= mean <= hi
    # the classical harmonic fill removes most of the lesion: it must beat no repair by a margin
    assert results["generator"]["harmonic"]["inside_err"][0] < 0.7 * mean


def test_rerun_is_cached_and_reproduces(study):
    cfg, results = study
    work = Path(cfg.work_dir)
    trained = {p: p.stat().st_mtime_ns for p in work.glob("gen_*/stage.json")} | \
              {p: p.stat().st_mtime_ns for p in work.glob("clip_*/stage.json")}
    for stage in list(work.glob("geneval_*")) + [work / "evaluate"]:  # recompute every number from the models
        (stage / "stage.json").unlink()
    again = run_study(cfg)
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # training stages came from the cache
    assert json.dumps(again["generator"], sort_keys=True) == json.dumps(results["generator"], sort_keys=True)
    assert json.dumps(again["segmentation"], sort_keys=True) == json.dumps(results["segmentation"], sort_keys=True)


def test_subject_ci_hand_computed():
    mean, lo, hi = subject_ci({"a": [1.0, 3.0], "b": [4.0], "c": [6.0]}, n_boot=500, seed=0)
    assert mean == pytest.approx(4.0)  # subjects weigh equally: (2 + 4 + 6) / 3
    assert 2.0 <= lo < mean < hi <= 6.0
    assert np.isnan(subject_ci({}, 10, 0)[0])


def test_unknown_variant_and_key_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"gen_variants=\['nope'\]: unknown \['nope'\]"):
        StudyConfig(out=str(tmp_path), work_dir=str(tmp_path), gen_variants=["nope"])
    with pytest.raises(SystemExit):
        load_study_config(str(ROOT / "configs" / "phantom_study.yaml"), "quick", ["--nope", "1"])
    cfg = load_study_config(str(ROOT / "configs" / "phantom_study.yaml"), "full", ["--gen_dpo_steps", "7"])
    assert cfg.preset == "full" and cfg.gen_dpo_steps == 7 and cfg.phantoms_n == 200
