"""The study's comparisons at the level of training runs (issue 22): run keys, pairing of runs across rows, the
run-level statistic, Holm over a family and the verdict from the adjusted p; on hand-made rows."""

from __future__ import annotations

import numpy as np
import pytest
from negdpo.core.stats import holm, run_level_diff, verdict_p

from negdpo.study.clips import run_key, run_tag
from negdpo.study.markdown import comparisons_md
from negdpo.study.segmentation import long_segmentation_rows
from negdpo.study.tables import adjust_family, align_runs, comparisons
from negdpo.study.variants import COMPARISONS, DESIGN, SUPERVISION, VARIANTS, stage2_comparisons

SUBJECTS = 6


def _rows(variant: str, run: str, values: list[float], prompt: str = "report") -> list[dict]:
    """One image per subject, subject k scored ``values[k]``."""
    return [{"variant": variant, "seed": int(run.split("/")[0]), "run": run, "image": f"mri_{k:04d}_0.png",
             "subject_id": f"mri_{k:04d}", "group": "mri_bright", "prompt": prompt, "dice": v}
            for k, v in enumerate(values)]


def test_run_tags_and_keys():
    assert run_tag(0) == "0" and run_tag(2, 2) == "2" and run_tag(2, 1002) == "2f1002"  # old names kept
    assert run_key("base", "1") == "1" and run_key("dpo_gen", "1") == "1/1" and run_key("dpo_gen", "1f1001") == "1/1001"
    rows = long_segmentation_rows(
        [{"checkpoint": "dpo_gen.s1f1001", "image": "us_0002_0.png", "positive": 1, "dice": 0.5, "control_dice": 0.1},
         {"checkpoint": "base.s1", "image": "us_0002_0.png", "positive": 1, "dice": 0.4, "control_dice": 0.2}],
        [], {"us_0002_0.png": "us"})
    assert [(r["variant"], r["seed"], r["run"], r["prompt"]) for r in rows] == [
        ("dpo_gen", 1, "1/1001", "report"), ("dpo_gen", 1, "1/1001", "irrelevant"),
        ("base", 1, "1", "report"), ("base", 1, "1", "irrelevant")]
    assert all(r["sal_auroc"] is None for r in rows)  # the evaluation had no saliency scores
    (rep, ctl) = long_segmentation_rows(
        [{"checkpoint": "base.s0", "image": "us_0002_0.png", "positive": 1, "dice": 0.5, "control_dice": 0.1,
          "sal_auroc": 0.8, "control_sal_auroc": 0.4, "sal_ap": float("nan"), "control_sal_ap": "0.25"}], [], {})
    assert (rep["sal_auroc"], ctl["sal_auroc"], rep["sal_ap"], ctl["sal_ap"]) == (0.8, 0.4, None, 0.25)


def test_runs_pair_with_their_base_and_their_chain():
    a = {("0/0", "s", "i"): 1.0, ("0/1000", "s", "i"): 2.0, ("1/1", "s", "i"): 3.0}
    base = {("0", "s", "i"): 0.5, ("1", "s", "i"): 0.25, ("2", "s", "i"): 9.0}
    assert align_runs(a, base) == {("0/0", "s", "i"): 0.5, ("0/1000", "s", "i"): 0.5, ("1/1", "s", "i"): 0.25}
    chain = {("0/0", "s", "i"): 0.7, ("0/1000", "s", "i"): 0.1}  # a stage-2 row of seed 0 vs the chain it learned from
    assert align_runs({("0", "s", "i"): 1.0}, chain) == {("0", "s", "i"): 0.7}
    assert align_runs(a, a) == a


def test_comparison_is_run_level_with_per_run_differences():
    base = [0.2, 0.3, 0.4, 0.5, 0.6, 0.1]
    shift = {"0/0": 0.10, "0/1000": 0.09, "1/1": 0.11}  # three fine-tune runs of two bases
    rows = _rows("base", "0", base) + _rows("base", "1", [b + 0.05 for b in base])
    for run, d in shift.items():
        ref = base if run.startswith("0") else [b + 0.05 for b in base]
        rows += _rows("dpo_gen", run, [b + d + 0.01 * k for k, b in enumerate(ref)])
    (c,) = comparisons(rows, 400, 0, pairs=(("dpo_gen", "base", "q"),))
    assert c["n_runs"] == 3 and c["n_subjects"] == SUBJECTS and c["n_pairs"] == 3 * SUBJECTS
    assert c["per_run"] == pytest.approx({r: d + 0.025 for r, d in shift.items()})  # + mean(0.01 k)
    assert c["diff_mean"] == pytest.approx(np.mean(list(shift.values())) + 0.025)
    a = {(r["run"], r["subject_id"], r["image"]): r["dice"] for r in rows if r["variant"] == "dpo_gen"}
    b = align_runs(a, {(r["run"], r["subject_id"], r["image"]): r["dice"] for r in rows if r["variant"] == "base"})
    st = run_level_diff(a, b, n_boot=400, seed=0, subjects="crossed")
    assert c["ci"] == pytest.approx([st.lo, st.hi]) and c["unit"] == st.unit
    assert c["p_boot"] == pytest.approx(st.p) and c["p"] == pytest.approx(max(st.p, st.p_t))
    assert c["subject_only"]["ci"] == pytest.approx(list(st.subject_only[1:]))
    assert c["p_holm"] == pytest.approx(c["p"])  # a family of one
    assert c["verdict"] == verdict_p(st.mean, c["p"]) == "better"
    assert c["subject_only"]["ci"][1] - c["subject_only"]["ci"][0] < c["ci"][1] - c["ci"][0]  # runs add noise
    assert "runs × subjects" in comparisons_md([c]) and "0/1000: +0.115" in comparisons_md([c])
    with pytest.raises(ValueError, match="metric"):
        comparisons(rows, 10, 0, "iou")
    auc = [{**r, "sal_auroc": 0.5 + 0.1 * (r["variant"] == "dpo_gen")} for r in rows]
    (a,) = comparisons(auc, 100, 0, "sal_auroc", pairs=(("dpo_gen", "base", "q"),), family="clip_saliency")
    assert a["diff_mean"] == pytest.approx(0.1) and a["family"] == "clip_saliency" and a["metric"] == "sal_auroc"


def test_one_run_says_so_and_prompt_gap_pairs_per_image():
    base = [0.2, 0.3, 0.4, 0.5, 0.6, 0.1]
    rows = (_rows("base", "0", base) + _rows("base", "0", [b - 0.05 for b in base], "irrelevant")
            + _rows("dpo_gen", "0/0", [b + 0.1 for b in base])
            + _rows("dpo_gen", "0/0", [b - 0.05 - 0.02 * (k % 2) for k, b in enumerate(base)], "irrelevant"))
    (c,) = comparisons(rows, 400, 0, "prompt_gap", pairs=(("dpo_gen", "base", "q"),))
    # subject k: (dpo_gen report - control) - (base report - control) = 0.1 + 0.02 (k % 2)
    assert c["diff_mean"] == pytest.approx(0.11) and c["n_runs"] == 1 and "one training run" in c["unit"]


def test_holm_over_the_family_decides_the_verdict():
    rows = [{"diff_mean": 0.1, "p": 0.03}, {"diff_mean": -0.2, "p": 0.04}, {"diff_mean": 0.3, "p": 0.001},
            {"diff_mean": 0.3, "p": None}]
    adjust_family(rows, "clip")
    assert [r["p_holm"] for r in rows[:3]] == pytest.approx([0.06, 0.06, 0.003])  # 0.03 x 2 (running max), 0.001 x 3
    assert rows[3]["p_holm"] is None  # not counted in the family
    assert [r["verdict"] for r in rows] == ["inconclusive", "inconclusive", "better", "inconclusive"]
    assert all(r["family"] == "clip" for r in rows)
    assert holm({"a": 0.03, "b": 0.04, "c": 0.001}) == pytest.approx({"a": 0.06, "b": 0.06, "c": 0.003})
    worse = [{"diff_mean": -0.2, "p": 0.001}]
    assert adjust_family(worse, "x")[0]["verdict"] == "worse"


def test_design_rows_and_comparisons():
    """Loss x negatives: every cell of the design is a row with its supervision; the comparisons hold the loss
    or the data fixed, and every design row meets MedCLIP-SAMv2's DHN-NCE and the base."""
    assert set(DESIGN) == {(loss, neg) for loss in ("dhn_nce", "dpo") for neg in ("twin", "gen", "harmonic", "twinfree")}
    assert DESIGN["dhn_nce", "twin"] == "dhn_nce" and DESIGN["dpo", "gen"] == "dpo_gen"  # old names kept
    assert set(VARIANTS) <= set(SUPERVISION) and SUPERVISION["dhn_nce_faithful"] == "none"
    pairs = {(a, b) for a, b, _ in COMPARISONS}
    for neg in ("twin", "gen", "harmonic"):
        assert (DESIGN["dpo", neg], DESIGN["dhn_nce", neg]) in pairs  # loss at fixed data
    for loss in ("dpo", "dhn_nce"):
        assert {(DESIGN[loss, "gen"], DESIGN[loss, o]) for o in ("twin", "harmonic")} <= pairs  # data at fixed loss
    for v in DESIGN.values():
        assert (v, "dhn_nce_faithful") in pairs and (v, "base") in pairs
    assert ("dpo_gen", "dhn_nce") not in pairs  # changes loss and data at once
    assert len(pairs) == len(COMPARISONS)
    assert {a for a, _, _ in stage2_comparisons("dpo_gen")} & set(DESIGN.values()) == set()


def _gen_rows(method: str, run: str, errs: list[float], paste: bool | None = True, modality: str = "mri") -> list[dict]:
    return [{"method": method, "paste_back": paste, "run": run, "file": f"{modality}_{k:04d}_0.png",
             "subject_id": f"{modality}_{k:04d}", "modality": modality, "inside_err": e} for k, e in enumerate(errs)]


def test_generator_comparisons_over_generator_seeds():
    """Learned rows pair run by run; a row that trains nothing (run "") pairs with every run; lower error is
    better; no-paste rows never enter; Holm over the generator family."""
    from negdpo.study.tables import generator_comparisons

    base = [0.10, 0.20, 0.15, 0.12, 0.18, 0.11]
    rows = (_gen_rows("harmonic_vae", "", base) + _gen_rows("harmonic_vae", "", [9.0] * 6, paste=False)
            + _gen_rows("sft", "0", [b - 0.03 for b in base]) + _gen_rows("sft", "1", [b - 0.05 for b in base])
            + _gen_rows("dpo", "0", [b - 0.01 for b in base]) + _gen_rows("dpo", "1", [b - 0.02 for b in base]))
    out = {(c["a"], c["b"]): c for c in generator_comparisons(rows, 400, 0)}
    assert set(out) == {("dpo", "sft"), ("sft", "harmonic_vae"), ("dpo", "harmonic_vae")}  # only rows that ran
    c = out["sft", "harmonic_vae"]
    assert c["per_run"] == pytest.approx({"0": -0.03, "1": -0.05}) and c["diff_mean"] == pytest.approx(-0.04)
    assert c["modality"] == "mri" and c["n_runs"] == 2 and c["higher_is_better"] is False
    assert c["verdict"] == verdict_p(c["diff_mean"], c["p_holm"], higher_is_better=False)
    assert out["dpo", "sft"]["per_run"] == pytest.approx({"0": 0.02, "1": 0.03})  # DPO's error is higher
    ps = {k: v["p"] for k, v in out.items()}
    assert {k: v["p_holm"] for k, v in out.items()} == pytest.approx(holm(ps))
    assert all(v["family"] == "generator" for v in out.values())


def test_vae_roundtrip_goes_through_the_autoencoder():
    """harmonic_vae's repair: the image at the UNet's size through encode (posterior mode) and decode, back to
    its size; with an identity autoencoder the image comes back (up to 8-bit resizing)."""
    from types import SimpleNamespace

    import torch

    from negdpo.study.generators import vae_roundtrip

    calls = []

    class IdentityVae:
        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, t):
            calls.append(tuple(t.shape))
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: t * 0.5))

        def decode(self, z):
            return SimpleNamespace(sample=z * 2.0)

    pipe = SimpleNamespace(vae=IdentityVae(), vae_scale_factor=4, unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)))
    img = np.tile(np.linspace(0.1, 0.9, 48, dtype=np.float32), (40, 1))
    (out,) = vae_roundtrip(pipe, [img])
    assert calls == [(1, 3, 32, 32)] and out.shape == img.shape
    assert np.abs(out - img).mean() < 0.02


def test_noise_components_and_minimum_detectable_effect():
    """The variance components of a paired difference (run, subject, image) and the MDE of the design, as the
    core.stats functions give them on the aligned differences; more runs never raise the MDE."""
    from negdpo.core.stats import design_mde, variance_components

    from negdpo.study.tables import noise

    rng = np.random.default_rng(0)
    base = list(rng.uniform(0.2, 0.6, SUBJECTS))
    rows = _rows("base", "0", base) + _rows("base", "1", base) + _rows("base", "2", base)
    for run, shift in (("0/0", 0.05), ("1/1", -0.02), ("2/2", 0.08)):
        rows += _rows("dpo_gen", run, [b + shift + e for b, e in zip(base, rng.normal(0, 0.03, SUBJECTS))])
    (n,) = noise(rows, (("dpo_gen", "base", "q"),), n_comparisons=4)
    diff = {(r["run"], r["subject_id"], r["image"]): r["dice"] - base[int(r["subject_id"][-4:])]
            for r in rows if r["variant"] == "dpo_gen"}
    comp = variance_components(diff, ("run", "subject", "image"))
    assert np.isnan(comp["image"]) and n["components"]["image"] is None  # one image per subject: not separable
    assert n["components"] == pytest.approx({**comp, "image": None}) and (n["n_runs"], n["n_subjects"]) == (3, SUBJECTS)
    usable = {**comp, "image": 0.0}
    kw = dict(n_subjects=SUBJECTS, n_images=1, n_comparisons=4)
    assert n["mde"] == pytest.approx(design_mde(usable, 3, **kw)) and n["mde"] > 0
    need = n["runs_for_target"]
    assert need is not None and design_mde(usable, need, **kw) <= 0.05 < design_mde(usable, need - 1, **kw)
    (one,) = noise([r for r in rows if r["run"] in ("0", "0/0")], (("dpo_gen", "base", "q"),), 4)
    assert one["mde"] is None and one["n_runs"] == 1  # one run: run-to-run noise not measured


def test_saliency_diagnostics_per_group():
    """Subject means of the map's lesion AUROC and partial r per row, prompt and lesion group (+ all)."""
    from negdpo.study.tables import saliency_diagnostics

    rows = []
    for k in range(4):
        group = "mri_bright" if k < 2 else "us"
        for prompt, auc in (("report", 0.9 - 0.1 * k), ("irrelevant", 0.5)):
            rows.append({"variant": "base", "seed": 0, "run": "0", "image": f"mri_{k:04d}_0.png",
                         "subject_id": f"mri_{k:04d}", "group": group, "prompt": prompt, "dice": 0.1,
                         "sal_auroc": auc, "sal_partial_r": 0.2 if prompt == "report" else None})
    diag = {(d["prompt"], d["group"]): d for d in saliency_diagnostics(rows, 100, 0)}
    assert set(diag) == {(p, g) for p in ("report", "irrelevant") for g in ("mri_bright", "us", "all")}
    assert diag["report", "mri_bright"]["sal_auroc"] == pytest.approx(0.85)
    assert diag["report", "us"]["sal_auroc"] == pytest.approx(0.65) and diag["report", "all"]["n_images"] == 4
    assert diag["irrelevant", "all"]["sal_auroc"] == pytest.approx(0.5) and diag["irrelevant", "all"]["sal_partial_r"] is None
    assert saliency_diagnostics([{**r, "sal_auroc": None} for r in rows], 100, 0) == []


def test_verdict_p_is_the_larger_of_bootstrap_and_t():
    """Three runs that agree in sign but not in size: the bootstrap's p sits at its floor, the t test over the
    run means does not reject; the verdict follows the larger p (docs/method.md#statistics)."""
    base = [0.2, 0.3, 0.4, 0.5, 0.6, 0.1]
    shift = {"0/0": 0.30, "1/1": 0.01, "2/2": 0.02}
    rows = []
    for run, d in shift.items():
        rows += _rows("base", run.split("/")[0], base) + _rows("dpo_gen", run, [b + d for b in base])
    (c,) = comparisons(rows, 400, 0, pairs=(("dpo_gen", "base", "q"),))
    assert c["p_boot"] < 0.05 < c["t_check"]["p"]
    assert c["p"] == c["t_check"]["p"] and c["verdict"] == "inconclusive"
    one = [r for r in rows if r["run"] in ("0", "0/0")]
    (c1,) = comparisons(one, 400, 0, pairs=(("dpo_gen", "base", "q"),))
    assert c1["t_check"]["p"] is None and c1["p"] == c1["p_boot"]  # one run: no t test, the bootstrap's p
