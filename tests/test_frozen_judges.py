"""The frozen judges of the generator table: residual-lesion detector and real-vs-generated AUC."""

from __future__ import annotations

import numpy as np
import pytest
from negdpo.generator.frozen_judges import (
    FEATURES,
    LesionDetector,
    RealismJudge,
    add_lesion_free,
    clustered_auc,
    fit_realism_judge,
    region_features,
    score_with_judges,
)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from negdpo.core.phantoms import ensure_phantoms
    from negdpo.core.scans import ScanFolder

    root = ensure_phantoms(tmp_path_factory.mktemp("judges"), n=40, size=64, slices=2, seed=0, pretrain_n=30,
                           lesion_area=(0.01, 0.15))
    folder = ScanFolder(root)
    pool = folder.load_split("pretrain")
    held = [s for split in ("val", "test") for s in folder.load_split(split) if s.positive]
    test = [s for s in folder.load_split("test") if s.positive]
    return {"pool": pool, "pool_pos": [s for s in pool if s.positive], "held": held, "test": test,
            "train": folder.load_split("train")}


@pytest.fixture(scope="module")
def detector(phantoms):
    return LesionDetector(seed=0).fit(phantoms["pool"])


def _harmonic(scans):
    from negdpo.core.fill import harmonic_fill

    from negdpo.study.data import repaint_mask

    return [harmonic_fill(s.image, repaint_mask(s.mask)) for s in scans]


def _constant(scans):
    from negdpo.study.data import repaint_mask

    out = []
    for s in scans:
        m = repaint_mask(s.mask)
        o = s.image.astype(np.float64).copy()
        o[m] = o[repaint_mask(m) & ~m].mean()
        out.append(o)
    return out


def _noise(scans, seed=0):
    from negdpo.study.data import repaint_mask

    rng = np.random.default_rng(seed)
    out = []
    for s in scans:
        o = s.image.astype(np.float64).copy()
        m = repaint_mask(s.mask)
        o[m] = rng.random(int(m.sum()))
        out.append(o)
    return out


def _other_twins(scans):
    """For each scan, the twin of the next subject of the same modality (a real image, not this scan's)."""
    out = [None] * len(scans)
    for mod in {s.name.split("_")[0] for s in scans}:
        idx = [i for i, s in enumerate(scans) if s.name.startswith(mod)]
        for i, j in zip(idx, idx[2:] + idx[:2]):  # 2 slices per subject: skip to the next subject
            out[i] = scans[j].twin
    return out


def test_region_features_translation_invariant_and_contrast_sign():
    rng = np.random.default_rng(0)
    img = 0.5 + 0.05 * rng.standard_normal((64, 64))
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 24) ** 2 + (xx - 24) ** 2 <= 36
    bright, dark = img.copy(), img.copy()
    bright[disk] += 0.3
    dark[disk] -= 0.3
    fb, fd = region_features(bright, disk), region_features(dark, disk)
    z, step = FEATURES.index("z_mean_lesion"), FEATURES.index("step")
    assert fb[z] > 3 and fd[z] < -3 and fb[step] > 3 and fd[step] < -3
    moved = np.roll(np.roll(bright, 10, 0), 7, 1)
    np.testing.assert_allclose(region_features(moved, np.roll(np.roll(disk, 10, 0), 7, 1)), fb, atol=1e-9)
    with pytest.raises(ValueError, match="non-empty"):
        region_features(img, np.zeros((64, 64), bool))


def test_detector_separates_test_positives_from_twins(detector, phantoms):
    # measured: accuracy 1.0 on the 12 test positives vs their twins (chance 0.5)
    acc = detector.accuracy_on(phantoms["test"])
    assert acc["n_positive"] == len(phantoms["test"]) >= 10
    assert acc["accuracy"] >= 0.9 and acc["sensitivity"] >= 0.8 and acc["specificity"] >= 0.8
    assert acc["accuracy"] == pytest.approx((acc["sensitivity"] + acc["specificity"]) / 2)
    assert acc["accuracy_ci"][0] <= acc["accuracy"] <= acc["accuracy_ci"][1]


def test_harmonic_fill_judged_lesion_free_much_more_often(detector, phantoms):
    held = phantoms["held"]
    masks = [s.mask for s in held]
    positive = detector.lesion_free_rate([s.image for s in held], masks)
    harmonic = detector.lesion_free_rate(_harmonic(held), masks)
    assert harmonic - positive >= 0.7  # measured: 1.00 vs 0.08
    # the study helper gives per-scan columns that agree with the detector
    judged = score_with_judges(detector, "harmonic", held, {None: _harmonic(held)})
    assert [c["lesion_free"] for c in judged["lesion"][None]] == \
        [float(p < 0.5) for p in detector.predict_proba(_harmonic(held), masks)]
    assert judged["realism"] == []


def test_detector_is_deterministic_and_refuses_evaluation_subjects(detector, phantoms):
    again = LesionDetector(seed=0).fit(phantoms["pool"])
    np.testing.assert_array_equal(again.model.coef, detector.model.coef)
    with pytest.raises(ValueError, match="pretrain"):
        LesionDetector().fit(phantoms["train"])
    with pytest.raises(ValueError, match="pretrain"):
        score_with_judges(detector, "identity", phantoms["held"], {None: [s.image for s in phantoms["held"]]},
                          pool_scans=phantoms["train"], pool_outputs={None: [s.image for s in phantoms["train"]]})


def test_save_load_round_trip(detector, phantoms, tmp_path):
    held = phantoms["held"]
    imgs, masks = [s.image for s in held], [s.mask for s in held]
    back = LesionDetector.load(detector.save(tmp_path / "det"))
    np.testing.assert_array_equal(back.predict_proba(imgs, masks), detector.predict_proba(imgs, masks))
    assert back.info["train_split"] == "pretrain"
    with np.load(tmp_path / "det" / "lesion_detector.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert set(z.files) == {"mean", "scale", "coef", "intercept"}
    pool = phantoms["pool_pos"]
    judge = fit_realism_judge([s.twin for s in pool], _constant(pool), [s.mask for s in pool], seed=0)
    judge_back = RealismJudge.load(judge.save(tmp_path / "real"))
    np.testing.assert_array_equal(judge_back.predict_proba(imgs, masks), judge.predict_proba(imgs, masks))


def test_realism_auc_near_half_for_real_images(phantoms):
    pool, held = phantoms["pool_pos"], phantoms["held"]
    judge = fit_realism_judge([s.twin for s in pool], _other_twins(pool), [s.mask for s in pool], seed=0)
    subjects = [s.name.rsplit("_", 1)[0] for s in held]
    auc, lo, hi = judge.auc_ci([s.twin for s in held], _other_twins(held), [s.mask for s in held], None,
                               subjects, subjects, n_boot=300)
    assert lo <= 0.5 <= hi or abs(auc - 0.5) < 0.15


@pytest.mark.parametrize("fake", [_constant, _noise])
def test_realism_auc_near_one_for_obvious_fakes_and_antisymmetric(phantoms, fake):
    pool, held = phantoms["pool_pos"], phantoms["held"]
    judge = fit_realism_judge([s.twin for s in pool], fake(pool), [s.mask for s in pool], seed=0)
    reals, fakes, masks = [s.twin for s in held], fake(held), [s.mask for s in held]
    auc = judge.auc(reals, fakes, masks)
    assert auc >= 0.95
    assert judge.auc(fakes, reals, masks) == pytest.approx(1 - auc, abs=1e-12)


def test_clustered_auc_hand_computed_and_swap_law():
    from scipy.stats import mannwhitneyu

    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert clustered_auc(y, s, n_boot=0)[0] == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ordered
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.random(60) + 0.3 * y
    subjects = [f"s{i // 3}" for i in range(60)]
    auc, lo, hi = clustered_auc(y, s, subjects, n_boot=200, seed=3)
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert auc == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
    assert lo < auc < hi
    auc2, lo2, hi2 = clustered_auc(1 - y, s, subjects, n_boot=200, seed=3)
    assert (auc2, lo2, hi2) == pytest.approx((1 - auc, 1 - hi, 1 - lo))


def test_add_lesion_free_subject_level_rate():
    gen = [{"method": "m", "paste_back": True, "modality": "mri", "subject_id": "a", "lesion_free": 1.0},
           {"method": "m", "paste_back": True, "modality": "mri", "subject_id": "a", "lesion_free": 0.0},
           {"method": "m", "paste_back": True, "modality": "us", "subject_id": "b", "lesion_free": 1.0},
           {"method": "m", "paste_back": False, "modality": "us", "subject_id": "b", "lesion_free": 0.0}]
    rows = [{"method": "m", "paste_back": True, "modality": m, "lesion_free_rate": None} for m in ("all", "mri", "us")]
    rows.append({"method": "m", "paste_back": False, "modality": "mri", "lesion_free_rate": None})
    add_lesion_free(rows, gen, n_boot=100, seed=0)
    assert [r["lesion_free_rate"] for r in rows] == [0.75, 0.5, 1.0, None]  # subjects a: 1/2, b: 1 -> (0.5 + 1) / 2
    assert rows[0]["lesion_free_rate_ci"][0] <= 0.75 <= rows[0]["lesion_free_rate_ci"][1]


def test_lesion_free_rate_falls_with_lesion_strength(detector, phantoms):
    held = phantoms["held"]
    masks = [s.mask for s in held]
    rates = [detector.lesion_free_rate([s.twin + a * (s.image - s.twin) for s in held], masks)
             for a in (0.0, 0.5, 1.0)]  # twin -> half-contrast lesion -> the positive
    assert rates[0] >= rates[1] >= rates[2] and rates[0] - rates[2] >= 0.7
