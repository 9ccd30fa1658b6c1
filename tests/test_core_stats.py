"""Bootstrap CIs against a hand-rolled resampler, subject clustering, paired differences, verdicts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from negdpo.core.stats import bootstrap_ci, cluster_means, fmt_ci, paired_diff_ci, subject_ci, verdict


def test_bootstrap_matches_independent_percentile_resampling():
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 0.2, size=40)
    mean, lo, hi = bootstrap_ci(x, n_boot=4000, seed=1)
    boots = x[np.random.default_rng(7).integers(0, x.size, (20000, x.size))].mean(1)
    ref_lo, ref_hi = np.percentile(boots, [2.5, 97.5])
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert lo == pytest.approx(ref_lo, abs=0.01) and hi == pytest.approx(ref_hi, abs=0.01)
    assert bootstrap_ci(x, n_boot=500, seed=2) == bootstrap_ci(x, n_boot=500, seed=2)  # same seed, same CI


def test_degenerate_inputs():
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    assert bootstrap_ci([1.0, 1.0, float("nan")]) == (1.0, 1.0, 1.0)
    assert fmt_ci((float("nan"),) * 3) == "n/a" and fmt_ci((0.5, 0.25, 0.75), 2) == "0.50 [0.25, 0.75]"


def test_subjects_weigh_equally():
    vals = {"a": [1.0, 1.0, 1.0, 1.0], "b": [0.0]}
    np.testing.assert_allclose(cluster_means(vals), [1.0, 0.0])
    assert subject_ci(vals, n_boot=200)[0] == 0.5  # not 0.8 (the image mean)


def test_paired_difference_and_verdicts():
    a = {f"i{k}": 0.5 + 0.01 * k for k in range(30)}
    b = {k: v - 0.1 for k, v in a.items()} | {"only_in_b": 9.0}
    stat = paired_diff_ci(a, b, n_boot=500)
    assert stat[0] == pytest.approx(0.1) and stat[1] == pytest.approx(0.1) and verdict(stat) == "better"
    assert verdict(paired_diff_ci(b, a, n_boot=500)) == "worse"
    assert verdict(stat, higher_is_better=False) == "worse"
    noisy = {k: v + (0.2 if i % 2 else -0.2) for i, (k, v) in enumerate(a.items())}
    assert verdict(paired_diff_ci(noisy, a, n_boot=500)) == "inconclusive"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=25))
def test_ci_contains_the_mean_and_is_ordered(xs):
    mean, lo, hi = bootstrap_ci(xs, n_boot=200, seed=0)
    assert lo <= mean + 1e-9 and mean <= hi + 1e-9
