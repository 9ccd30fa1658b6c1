"""Continuous saliency metrics (docs/method.md#saliency-metrics) against hand-computed values, independent
implementations (scikit-learn; the partial correlation from the inverse correlation matrix) and laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from negdpo.segmentation import saliency_metrics as S

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)

# lesion pixels {0.8, 0.4}; background {0.9, 0.4, 0.2, 0.1} (one lesion/background tie at 0.4)
SAL = np.array([[0.8, 0.9, 0.2], [0.4, 0.4, 0.1]])
MASK = np.array([[1, 0, 0], [1, 0, 0]], bool)


def test_auroc_by_hand_with_a_tie():
    # 0.8 beats 0.4, 0.2, 0.1, loses to 0.9: 3; 0.4 ties 0.4 (1/2), beats 0.2, 0.1: 2.5 -> 5.5 / 8
    assert S.lesion_auroc(SAL, MASK) == pytest.approx(5.5 / 8, abs=1e-12)
    assert S.lesion_auroc(-SAL, MASK) == pytest.approx(1 - 5.5 / 8, abs=1e-12)  # reversed map: 1 - AUROC


def test_ap_by_hand_ties_form_one_threshold():
    # ranked 0.9 (bg), 0.8 (L): P 1/2 at R 1/2; then {0.4 L, 0.4 bg} together: P 2/4 at R 1 -> 0.25 + 0.25.
    # Breaking the tie with the lesion first would give 0.25 + 0.5 * 2/3.
    assert S.lesion_ap(SAL, MASK) == pytest.approx(0.5, abs=1e-12)
    # no ties: ranked L, bg, L, bg, bg, bg -> 1/2 * 1 + 1/2 * 2/3
    sal = np.array([[0.9, 0.8, 0.2], [0.7, 0.3, 0.1]])
    assert S.lesion_ap(sal, np.array([[1, 0, 0], [1, 0, 0]])) == pytest.approx(0.5 + 1 / 3, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_and_ap_equal_scikit_learn_with_many_ties(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(seed)
    sal = rng.integers(0, 6, (9, 11)) / 5.0  # six levels: ties everywhere
    mask = rng.random((9, 11)) < 0.3 + 0.1 * seed
    assert S.lesion_auroc(sal, mask) == pytest.approx(roc_auc_score(mask.ravel(), sal.ravel()), abs=1e-12)
    assert S.lesion_ap(sal, mask) == pytest.approx(average_precision_score(mask.ravel(), sal.ravel()), abs=1e-12)


def test_map_equal_to_mask_is_perfect_and_constant_map_is_chance():
    mask = np.zeros((12, 10), bool)
    mask[3:6, 2:7] = True
    sal = mask.astype(np.float32)
    assert S.lesion_auroc(sal, mask) == 1.0 and S.lesion_ap(sal, mask) == 1.0 and S.pointing_game(sal, mask) == 1.0
    flat = np.full(mask.shape, 0.3)
    assert S.lesion_auroc(flat, mask) == 0.5
    assert S.lesion_ap(flat, mask) == pytest.approx(mask.mean(), abs=1e-12)  # AP of no ranking = prevalence
    assert S.pointing_game(flat, mask) == pytest.approx(mask.mean(), abs=1e-12)  # every pixel is a maximum


def test_pointing_tolerance_is_euclidean_px_and_ties_share():
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = True
    sal = np.zeros((20, 20))
    sal[8, 9] = 1.0  # 5 px from the lesion pixel (3-4-5)
    assert S.pointing_game(sal, mask) == 0.0
    assert S.pointing_game(sal, mask, tolerance=4.99) == 0.0
    assert S.pointing_game(sal, mask, tolerance=5.0) == 1.0
    sal[5, 5] = 1.0  # two tied maxima: one on the lesion, one 5 px away
    assert S.pointing_game(sal, mask, tolerance=2.0) == 0.5
    sal[5, 5] = 0.5  # a lower value on the lesion does not count
    assert S.pointing_game(sal, mask, tolerance=2.0) == 0.0


def test_region_restricts_every_metric():
    rng = np.random.default_rng(3)
    sal, image = rng.random((10, 12)), rng.random((10, 12))
    sal[3, 4] = 1.0  # the maximum in the region, on the lesion
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True
    mask[7, 1] = True  # a lesion pixel outside the region
    region = np.zeros_like(mask)
    region[1:7, 1:11] = True
    changed = sal.copy()
    changed[~region] = rng.random(int((~region).sum())) * 5
    changed[0, 0] = 10.0  # the maximum now lies outside the region, off the lesion
    b = S.local_brightness(image)
    for fn in (S.lesion_auroc, S.lesion_ap, S.pointing_game):
        assert fn(changed, mask, region=region) == fn(sal, mask, region=region)
    assert S.partial_r(changed, mask, b, region) == S.partial_r(sal, mask, b, region)
    # the region's pixels are scored as a list: the same as a 1-row image of them
    row = (sal[region][None], mask[region][None])
    assert S.lesion_auroc(sal, mask, region) == S.lesion_auroc(*row)
    assert S.lesion_ap(sal, mask, region) == S.lesion_ap(*row)
    assert S.pointing_game(sal, mask, region=region) == S.pointing_game(*row)
    assert S.partial_r(sal, mask, b, region) == pytest.approx(S.partial_corr(sal[region], mask[region], b[region]))
    assert S.pointing_game(changed, mask) == 0.0 and S.pointing_game(changed, mask, region=region) == 1.0


def test_undefined_without_lesion_or_background():
    sal, b = np.random.default_rng(0).random((6, 6)), np.zeros((6, 6))
    for mask in (np.zeros((6, 6), bool), np.ones((6, 6), bool)):
        assert math.isnan(S.lesion_auroc(sal, mask)) and math.isnan(S.lesion_ap(sal, mask))
        assert math.isnan(S.partial_r(sal, mask, b))
    assert math.isnan(S.pointing_game(sal, np.zeros((6, 6), bool)))
    region = np.zeros((6, 6), bool)
    region[0] = True
    mask = np.zeros((6, 6), bool)
    mask[3, 3] = True  # the lesion lies outside the region
    assert math.isnan(S.lesion_auroc(sal, mask, region)) and math.isnan(S.pointing_game(sal, mask, region=region))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        S.lesion_auroc(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="region"):
        S.lesion_ap(np.zeros((4, 4)), np.zeros((4, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="brightness"):
        S.partial_r(np.zeros((4, 4)), np.eye(4), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="equal lengths"):
        S.partial_corr(np.zeros(4), np.zeros(4), np.zeros(5))


# -- partial correlation ---------------------------------------------------------------------------
def test_partial_corr_by_hand():
    # u, v are orthogonal to 1, z and to each other: the residuals of x = 2z + u and y = -z + u + v are u and u + v
    z = np.array([0.0, 1.0, 2.0, 3.0])
    u, v = np.array([1.0, -1.0, -1.0, 1.0]), np.array([1.0, -3.0, 3.0, -1.0])
    assert S.partial_corr(2 * z + u, -z + u + v, z) == pytest.approx(4 / (2 * math.sqrt(24)), abs=1e-12)
    assert S.partial_corr(2 * z + u, -z - u - v, z) == pytest.approx(-4 / (2 * math.sqrt(24)), abs=1e-12)
    assert S.partial_corr(5 - 3 * z + u, 7 + z + u, z) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_partial_corr_equals_the_inverse_correlation_matrix_formula(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=200) * 2 + 1
    x = 0.8 * z + rng.normal(size=200) + 3
    y = -0.5 * z + 0.4 * x + rng.normal(size=200)
    prec = np.linalg.inv(np.corrcoef(np.stack([x, y, z])))
    expected = -prec[0, 1] / math.sqrt(prec[0, 0] * prec[1, 1])
    assert S.partial_corr(x, y, z) == pytest.approx(expected, abs=1e-10)
    # the textbook first-order formula from the pairwise correlations
    r = np.corrcoef(np.stack([x, y, z]))
    assert expected == pytest.approx((r[0, 1] - r[0, 2] * r[1, 2]) / math.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2)))
    assert abs(S.partial_corr(x, y, z) - r[0, 1]) > 0.05  # conditioning on z changes the plain correlation


def test_brightness_map_has_partial_r_zero_and_mask_plus_brightness_one():
    rng = np.random.default_rng(1)
    image = rng.random((32, 40))
    mask = np.zeros((32, 40), bool)
    mask[10:18, 12:22] = True
    image[mask] += 0.5  # a bright lesion: brightness alone finds it
    b = S.local_brightness(image)
    assert S.lesion_auroc(b, mask) > 0.9  # a brightness detector scores a high AUROC ...
    assert S.partial_r(b, mask, b) == 0.0  # ... but nothing beyond brightness
    assert S.partial_r(0.2 + 3 * b, mask, b) == 0.0
    assert S.partial_r(np.full(mask.shape, 0.4), mask, b) == 0.0  # a constant map knows nothing either
    assert S.partial_r(mask + 0.7 * b, mask, b) == pytest.approx(1.0, abs=1e-12)
    assert S.partial_r(1 - mask - 0.7 * b, mask, b) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(S.partial_r(b, mask, mask.astype(float)))  # the mask is a function of "brightness"


def test_local_brightness_window_is_three_percent_of_the_short_side():
    image = np.zeros((200, 101))
    image[100, 50] = 1.0
    b = S.local_brightness(image)
    assert b.sum() == pytest.approx(1.0, abs=1e-9)
    rows, cols = np.arange(200)[:, None] - 100, np.arange(101)[None, :] - 50
    sigma = 0.03 * 101
    assert float((b * rows ** 2).sum()) == pytest.approx(sigma ** 2, rel=1e-3)  # the Gaussian's variance
    assert float((b * cols ** 2).sum()) == pytest.approx(sigma ** 2, rel=1e-3)
    rgb = np.stack([image * 3, image * 0, image * 0], -1)
    np.testing.assert_allclose(S.local_brightness(rgb), b, atol=1e-12)  # RGB -> gray by the mean
    np.testing.assert_array_equal(S.local_brightness(image, sigma=0), image)


# -- one scan: region and reference ----------------------------------------------------------------
def test_reference_region_is_anatomy_and_lesion():
    image = np.zeros((40, 40), np.float32)
    image[8:32, 8:32] = 0.8  # the anatomy
    mask = np.zeros((40, 40), bool)
    mask[30:36, 30:36] = True  # partly outside it
    ref = S.reference(image, mask)
    assert ref.region[mask].all() and ref.region[16, 16] and not ref.region[2, 2] and not ref.region[37, 20]
    sal = np.zeros((40, 40))
    sal[2, 2] = 1.0  # the maximum lies in the dark frame outside the anatomy
    sal[mask] = 0.9
    row = S.saliency_metrics(sal, ref, tolerance=0.0)
    assert list(row) == list(S.COLUMNS)
    assert row["sal_pointing"] == 1.0 and row["sal_auroc"] == 1.0 and row["sal_ap"] == 1.0
    assert S.pointing_game(sal, mask) == 0.0  # over the whole frame it misses
    np.testing.assert_allclose(ref.brightness, S.local_brightness(image))


# -- laws ------------------------------------------------------------------------------------------
maps = arrays(np.int64, (5, 6), elements=st.integers(0, 9))
masks = arrays(bool, (5, 6), elements=st.booleans())


@FAST
@given(sal=maps, mask=masks, transform=st.sampled_from(["affine", "cube", "exp"]))
def test_monotone_transforms_leave_auroc_ap_pointing_unchanged(sal, mask, transform):
    f = {"affine": lambda s: 0.5 * s + 2.0, "cube": lambda s: s.astype(float) ** 3 - 4.0,
         "exp": lambda s: np.exp(s / 3.0)}[transform]
    for fn in (S.lesion_auroc, S.lesion_ap, S.pointing_game):
        a, b = fn(sal, mask), fn(f(sal), mask)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    auroc = S.lesion_auroc(sal, mask)
    if not math.isnan(auroc):
        assert 0.0 <= auroc <= 1.0 and S.lesion_auroc(-sal, mask) == pytest.approx(1.0 - auroc, abs=1e-12)
        assert 0.0 < S.lesion_ap(sal, mask) <= 1.0


@FAST
@given(seed=st.integers(0, 2**31 - 1), a=st.floats(-3, 3), c=st.floats(-3, 3))
def test_partial_r_ignores_affine_brightness_terms(seed, a, c):
    rng = np.random.default_rng(seed)
    sal, b = rng.random((6, 7)), rng.random((6, 7))
    mask = rng.random((6, 7)) < 0.4
    if not mask.any() or mask.all():
        mask[0, 0], mask[1, 1] = True, False
    base = S.partial_r(sal, mask, b)
    assert -1.0 <= base <= 1.0
    assert S.partial_r(sal + a * b + c, mask, b) == pytest.approx(base, abs=1e-9)
    assert S.partial_r(sal, mask, a * b + c if abs(a) > 1e-3 else b) == pytest.approx(base, abs=1e-9)
