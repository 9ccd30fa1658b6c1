"""The phantom study, reduced: every stage runs, the results.json contract holds, its numbers come from the
per-image data (recomputed here by hand), reruns reproduce them; the table builders on hand-made rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.stats import subject_ci
from negdpo.generator.sample import paste_back_blend

from negdpo.study import StudyConfig, load_study_config, run_study
from negdpo.study_tables import comparisons, generator_rows, segmentation_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "phantom_study.yaml")
SEG_KEYS = {"variant", "prompt", "dice_mean", "dice_ci", "n_images", "n_seeds", "dice_by_group", "prompt_gap",
            "prompt_gap_ci"}


def _reduced(tmp: Path) -> StudyConfig:
    cfg = load_study_config(CONFIG, "quick", [])
    return StudyConfig(**{**cfg.__dict__, "out": str(tmp / "results"), "work_dir": str(tmp / "work"),
                          "phantoms_n": 8, "phantoms_pretrain_n": 4, "gen_autoencoder_steps": 20,
                          "gen_sft_steps": 2, "gen_dpo_steps": 2, "gen_sample_steps": 2,
                          "gen_variants": ["sft", "dpo_mi_sdpo"], "pairs_k": 2, "pairs_steps": 2,
                          "clip_variants": ["base", "dpo_gen", "dpo_harmonic"], "clip_seeds": 2,
                          "clip_pretrain_steps": 2, "clip_finetune_steps": 2, "clip_batch": 2, "bootstrap": 50,
                          "eval_sam": "none",
                          "gen_extra": {**cfg.gen_extra, "eval_pairs": 4, "eval_draws": 1},
                          "clip_extra": {**cfg.clip_extra, "tsne": False, "eval_batch_size": 8},
                          "eval_extra": {**cfg.eval_extra, "m2ib_steps": 2, "m2ib_samples": 2}})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = _reduced(tmp)
    return cfg, run_study(cfg)


def _meta(cfg: StudyConfig) -> list[dict]:
    return list(csv.DictReader(open(Path(cfg.work_dir) / "phantoms" / "data" / "meta.csv")))


def test_results_contract(study):
    cfg, results = study
    on_disk = json.loads((Path(cfg.out) / "results.json").read_text())
    assert on_disk["segmentation"] == results["segmentation"]
    assert {"preset", "code_version", "n_test_positive", "oracle_box_dice", "segmentation", "comparisons",
            "generator", "realism_auc"} <= set(on_disk)
    assert on_disk["preset"] == "quick" and on_disk["realism_auc"] == {}
    test_pos = [r for r in _meta(cfg) if r["split"] == "test" and r["positive"] == "1"]
    assert on_disk["n_test_positive"] == len(test_pos) > 0
    seg = on_disk["segmentation"]
    assert [(r["variant"], r["prompt"]) for r in seg] == [
        (v, p) for v in ("base", "dpo_gen", "dpo_harmonic") for p in ("report", "word", "irrelevant")]
    for r in seg:
        assert set(r) == SEG_KEYS and r["n_seeds"] == 2 and r["n_images"] == len(test_pos)
        assert set(r["dice_by_group"]) == {"mri_bright", "mri_dark", "us"}
        lo, hi = r["dice_ci"]
        assert lo <= r["dice_mean"] <= hi
        assert (r["prompt_gap"] is not None) == (r["prompt"] == "report")  # the gap is a report-row column
    assert [(c["metric"], c["a"], c["b"]) for c in on_disk["comparisons"]] == [
        (m, a, b) for m in ("dice", "prompt_gap") for a, b in (("dpo_gen", "base"), ("dpo_harmonic", "dpo_gen"))]
    for c in on_disk["comparisons"]:
        assert c["verdict"] in ("better", "worse", "inconclusive")
        assert c["n_pairs"] == 2 * len(test_pos)  # images x seeds, paired
    gen = {(r["method"], r["paste_back"], r["modality"]) for r in on_disk["generator"]}
    for method in ("sft", "dpo_mi_sdpo"):
        assert {(method, p, m) for p in (True, False) for m in ("mri", "us", "all")} <= gen
    assert ("identity", None, "all") in gen and ("harmonic", None, "all") in gen
    assert all(r["lesion_free_rate"] is None for r in on_disk["generator"])  # no judge yet: no invented number
    assert on_disk["oracle_box_dice"] is None  # no SAM in this run: no oracle-box number
    md = (Path(cfg.out) / "results.md").read_text()
    for text in ("## Zero-shot segmentation", "| CLIP-DPO, harmonic-fill negatives (no generator) | report |",
                 "## Comparisons", "harmonic-fill vs generated negatives", "| SFT only | yes | mri |",
                 "| DPO + MI + SDPO | no | us |", "| positive itself (no repair) | — | all |",
                 "Realism AUC (real-vs-generated judge): not measured", "Oracle box: not measured", "Smoke preset"):
        assert text in md, text
    assert "| DPO + MI |" not in md  # variants that did not run are not reported
    assert {"phantoms", "clip_base_s1", "clip_dpo_harmonic_s0", "harmonic_pairs", "evaluate", "evaluate_word"} <= set(
        on_disk["stage_seconds"]) and "## Run time per stage" in md
    figs = {p.name for p in (Path(cfg.out) / "figures").glob("*.png")}
    assert {"generator_sft.png", "generator_dpo_mi_sdpo.png", "generator_curves.png", "clip_curves.png"} <= figs


def test_numbers_come_from_the_data(study):
    """No-repair error recomputed from the files; paste-back keeps the outside exactly; the contract's
    prompt gap, group means and comparison are recomputed here from segmentation_metrics.csv."""
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
    gen = {(r["method"], r["paste_back"], r["modality"]): r for r in results["generator"]}
    identity = gen["identity", None, "all"]
    assert identity["inside_err"] == pytest.approx(np.mean([np.mean(v) for v in per_subject.values()]), rel=1e-6)
    assert identity["inside_err_ci"][0] <= identity["inside_err"] <= identity["inside_err_ci"][1]
    assert gen["harmonic", None, "all"]["inside_err"] < 0.7 * identity["inside_err"]
    for method in ("sft", "dpo_mi_sdpo"):  # paste-back: the outside is the source exactly (PSNR_IDENTICAL)
        assert gen[method, True, "all"]["outside_psnr"] == 99.0
        assert gen[method, False, "all"]["outside_psnr"] < 99.0

    rows = list(csv.DictReader(open(Path(cfg.out) / "segmentation_metrics.csv")))
    dice = {(r["variant"], r["seed"], r["image"], r["prompt"]): float(r["dice"]) for r in rows}
    groups = {r["file"]: r["group"] for r in _meta(cfg)}
    assert all(r["group"] == groups[r["image"]] for r in rows)
    seg = {(r["variant"], r["prompt"]): r for r in results["segmentation"]}
    keys = {(s, i) for v, s, i, p in dice if v == "base"}
    gap = np.mean([dice["base", s, i, "report"] - dice["base", s, i, "irrelevant"] for s, i in keys])
    assert seg["base", "report"]["prompt_gap"] == pytest.approx(gap, abs=1e-12)
    for g in ("mri_bright", "mri_dark", "us"):
        vals = [dice["dpo_gen", s, i, "word"] for s, i in keys if groups[i] == g]
        assert seg["dpo_gen", "word"]["dice_by_group"][g] == (pytest.approx(np.mean(vals)) if vals else None)
    diff = np.mean([dice["dpo_gen", s, i, "report"] - dice["base", s, i, "report"] for s, i in keys])
    comp = {(c["metric"], c["a"], c["b"]): c for c in results["comparisons"]}
    assert comp["dice", "dpo_gen", "base"]["diff_mean"] == pytest.approx(diff, abs=1e-12)
    gaps = {v: {(sd, i): dice[v, sd, i, "report"] - dice[v, sd, i, "irrelevant"] for sd, i in keys}
            for v in ("dpo_gen", "base")}
    assert comp["prompt_gap", "dpo_gen", "base"]["diff_mean"] == pytest.approx(
        np.mean([gaps["dpo_gen"][k] - gaps["base"][k] for k in keys]), abs=1e-12)
    # the base CLIPs pre-trained on the pool, never on an evaluation subject
    stamp = json.loads((Path(cfg.work_dir) / "clip_base_s0" / "stage.json").read_text())
    assert stamp["settings"]["split"] == "pretrain" and results["clip_pretrain_split"] == "pretrain"


def test_rerun_is_cached_and_reproduces(study):
    cfg, results = study
    work = Path(cfg.work_dir)
    stamps = list(work.glob("*/stage.json"))
    assert all(json.loads(p.read_text())["settings"]["preset"] == "quick" for p in stamps)  # keys name the preset
    trained = {p: p.stat().st_mtime_ns for p in stamps if p.parent.name.startswith(("gen_", "clip_"))}
    assert len([p for p in trained if p.parent.name.startswith("clip_")]) == 6  # 3 variants x 2 seeds
    for stage in [*work.glob("geneval_*"), work / "evaluate", work / "evaluate_word"]:
        (stage / "stage.json").unlink()  # recompute every number from the models
    again = run_study(cfg)
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # training stages came from the cache
    for key in ("generator", "segmentation", "comparisons", "oracle_box_dice"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(results[key], sort_keys=True), key


# -- the table builders on hand-made rows ----------------------------------------------------------
def _seg_rows(base: list[float], other: list[float], ctl: list[float]) -> list[dict]:
    rows = []
    for i, (b, o, c) in enumerate(zip(base, other, ctl)):
        img = {"image": f"mri_{i:04d}_0.png", "subject_id": f"mri_{i:04d}", "seed": 0,
               "group": "mri_bright" if i % 2 else "us"}
        rows += [{**img, "variant": "base", "prompt": "report", "dice": b},
                 {**img, "variant": "base", "prompt": "irrelevant", "dice": c},
                 {**img, "variant": "dpo_gen", "prompt": "report", "dice": o}]
    return rows


def test_tables_hand_computed_and_verdicts():
    base = [0.2, 0.3, 0.4, 0.5, 0.6, 0.1]
    rows = _seg_rows(base, [b + 0.1 + 0.01 * k for k, b in enumerate(base)], [b - 0.05 for b in base])
    seg = {(r["variant"], r["prompt"]): r for r in segmentation_rows(rows, 200, 0)}
    assert seg["base", "report"]["dice_mean"] == pytest.approx(np.mean(base))
    assert seg["base", "report"]["prompt_gap"] == pytest.approx(0.05)  # every image: report - irrelevant = 0.05
    assert seg["base", "report"]["prompt_gap_ci"] == pytest.approx([0.05, 0.05])
    assert seg["base", "report"]["dice_by_group"] == {"mri_bright": pytest.approx(np.mean(base[1::2])),
                                                      "mri_dark": None, "us": pytest.approx(np.mean(base[0::2]))}
    assert seg["dpo_gen", "report"]["prompt_gap"] is None  # no irrelevant-prompt rows for it
    (comp,) = comparisons(rows, 500, 0)
    assert (comp["a"], comp["b"], comp["verdict"]) == ("dpo_gen", "base", "better")
    assert comp["diff_mean"] == pytest.approx(0.125)  # 0.1 + 0.01 * mean(0..5)
    assert comparisons(rows, 500, 0, "prompt_gap") == []  # dpo_gen has no irrelevant-prompt rows here
    ctl = [{**r, "variant": "dpo_gen", "dice": r["dice"] - 0.02 * (k % 2)}
           for k, r in enumerate(r for r in rows if r["variant"] == "base" and r["prompt"] == "irrelevant")]
    (gap,) = comparisons(rows + ctl, 500, 0, "prompt_gap")
    # image k: (dpo_gen report - its control) - (base report - base control) = 0.1 + 0.01 k + 0.02 (k % 2)
    assert gap["metric"] == "prompt_gap" and gap["diff_mean"] == pytest.approx(0.125 + 0.01)
    with pytest.raises(ValueError, match="metric"):
        comparisons(rows, 10, 0, "iou")
    worse = _seg_rows(base, [b - 0.1 for b in base], base)
    assert comparisons(worse, 500, 0)[0]["verdict"] == "worse"
    mixed = _seg_rows(base, [b + d for b, d in zip(base, (0.1, -0.1, 0.1, -0.1, 0.1, -0.1))], base)
    assert comparisons(mixed, 500, 0)[0]["verdict"] == "inconclusive"  # the CI contains 0


def test_generator_rows_per_modality_and_paste():
    rows = [{"method": "dpo", "paste_back": p, "file": f"{m}_{i:04d}_0.png", "subject_id": f"{m}_{i:04d}",
             "modality": m, "inside_err": e + (0.0 if p else 0.5), "outside_psnr": 99.0 if p else 20.0,
             "outside_mi": 1.0, "residual_lesion": 0.1}
            for p in (True, False) for m, e in (("mri", 0.1), ("us", 0.3)) for i in range(3)]
    out = {(r["method"], r["paste_back"], r["modality"]): r for r in generator_rows(rows, 100, 0)}
    assert len(out) == 6
    assert out["dpo", True, "mri"]["inside_err"] == pytest.approx(0.1)
    assert out["dpo", True, "all"]["inside_err"] == pytest.approx(0.2)
    assert out["dpo", False, "us"]["inside_err"] == pytest.approx(0.8)
    assert out["dpo", False, "all"]["outside_psnr"] == pytest.approx(20.0)
    assert out["dpo", True, "all"]["n_images"] == 6 and out["dpo", True, "all"]["lesion_free_rate"] is None


def test_paste_back_blend_seam():
    rng = np.random.default_rng(0)
    src, gen = rng.random((32, 32)).astype(np.float32), rng.random((32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = paste_back_blend(src, gen, mask, seam_px=3.0)
    assert np.array_equal(out[~mask], src[~mask])  # outside: the source exactly
    assert np.allclose(out[11:21, 11:21], gen[11:21, 11:21])  # >= 3 px inside: the output
    w = 1.0 / 3.0  # border pixels (distance 1): one third output
    assert out[8, 15] == pytest.approx(w * gen[8, 15] + (1 - w) * src[8, 15], abs=1e-6)
    hard = paste_back_blend(src, gen, mask, seam_px=1.0)
    assert np.array_equal(hard, np.where(mask, gen, src))
    rgb = paste_back_blend(np.stack([src] * 3, -1), np.stack([gen] * 3, -1), mask, 3.0)
    assert np.allclose(rgb[..., 1], out)
    with pytest.raises(ValueError, match="shapes differ"):
        paste_back_blend(src, gen[:16], mask)


def test_presets_medium_size_and_positives(tmp_path):
    """medium: >= 128 px, >= 60 test positives (split assignment does not depend on the image size)."""
    from negdpo.core.phantoms import PhantomConfig, generate

    cfg = load_study_config(CONFIG, "medium", [])
    assert cfg.phantoms_size >= 128 and cfg.clip_seeds >= 3 and cfg.phantoms_pretrain_n > 0
    assert cfg.work_dir != load_study_config(CONFIG, "quick", []).work_dir
    assert set(cfg.clip_variants) == {"base", "dhn_nce", "dpo_gen", "dpo_twin", "dpo_harmonic", "dpo_entropy", "stages"}
    root = generate(PhantomConfig(out=str(tmp_path / "m"), n=cfg.phantoms_n, size=16, slices=cfg.phantoms_slices,
                                  seed=cfg.seed, preview=False))
    rows = list(csv.DictReader(open(root / "meta.csv")))
    assert sum(r["split"] == "test" and r["positive"] == "1" for r in rows) >= 60


def test_oracle_box_prompts_sam_with_the_ground_truth_box(phantom_dir, monkeypatch):
    """The oracle row hands SAM each test positive's own mask (-> its box) and scores against it."""
    import negdpo.core.models as models
    import negdpo.segmentation.sam_prompt as sam_prompt
    from negdpo.core.scans import ScanFolder

    from negdpo.study_eval import oracle_box

    class BoxFill:  # a "SAM" that fills the box of the coarse mask it is prompted with
        def __init__(self, sam, cfg):
            assert cfg.prompt == "box" and cfg.box_mode == "union"

        def set_image(self, image):
            pass

        def segment(self, coarse, seed):
            ys, xs = np.nonzero(coarse)
            pred = np.zeros_like(coarse, bool)
            pred[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            return pred, {}

    monkeypatch.setattr(models, "load_sam", lambda *a, **k: None)
    monkeypatch.setattr(sam_prompt, "SamSegmenter", BoxFill)
    rows = oracle_box(phantom_dir, "test", "tiny", None, "cpu")
    positives = [s for s in ScanFolder(phantom_dir).load_split("test") if s.positive]
    assert [r["image"] for r in rows] == [s.name for s in positives] and rows
    for r, s in zip(rows, positives):
        area = s.mask.sum()
        ys, xs = np.nonzero(s.mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert r["dice"] == pytest.approx(2 * area / (area + box))  # the mask lies inside its own box


def test_subject_ci_hand_computed():
    mean, lo, hi = subject_ci({"a": [1.0, 3.0], "b": [4.0], "c": [6.0]}, n_boot=500, seed=0)
    assert mean == pytest.approx(4.0)  # subjects weigh equally: (2 + 4 + 6) / 3
    assert 2.0 <= lo < mean < hi <= 6.0
    assert np.isnan(subject_ci({}, 10, 0)[0])


def test_unknown_variant_and_key_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"gen_variants=\['nope'\]: unknown \['nope'\]"):
        StudyConfig(out=str(tmp_path), work_dir=str(tmp_path), gen_variants=["nope"])
    with pytest.raises(ValueError, match="phantoms_lesion_area"):
        StudyConfig(out=str(tmp_path), work_dir=str(tmp_path), phantoms_lesion_area=[0.2, 0.1])
    with pytest.raises(ValueError, match=r"\['control_prompt'\] are set by the study"):
        StudyConfig(out=str(tmp_path), work_dir=str(tmp_path), eval_extra={"control_prompt": "a dog"})
    with pytest.raises(SystemExit):
        load_study_config(CONFIG, "quick", ["--nope", "1"])
    cfg = load_study_config(CONFIG, "full", ["--gen_dpo_steps", "7"])
    assert cfg.preset == "full" and cfg.gen_dpo_steps == 7 and cfg.phantoms_n == 200
