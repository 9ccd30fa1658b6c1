"""Bootstrap CIs against a hand-rolled resampler, subject clustering, paired differences, verdicts; run-level
comparisons (hand-computed estimates and p-values, a loop reference, laws, coverage), Holm, variance components
and the minimum detectable effect."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from negdpo.core.stats import (
    UNIT_ONE_RUN,
    UNIT_RUNS,
    bootstrap_ci,
    bootstrap_p,
    cluster_means,
    design_mde,
    fmt_ci,
    holm,
    minimum_detectable_effect,
    paired_diff_ci,
    run_level_diff,
    run_t,
    subject_ci,
    variance_components,
    verdict,
    verdict_p,
)


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


def test_no_resampling_gives_no_interval_and_the_evaluation_summary_agrees():
    """``n_boot`` 0 (``negdpo evaluate --bootstrap 0``): the mean and no interval (NaN), in core.stats and in the
    evaluation summary that uses it (its own copy used to report the zero-width [mean, mean])."""
    from negdpo.segmentation.report import _fmt, describe

    mean, lo, hi = bootstrap_ci([0.2, 0.4, 0.9], n_boot=0)
    assert mean == pytest.approx(0.5) and np.isnan(lo) and np.isnan(hi)
    d = describe([0.2, 0.4, 0.9], n_boot=0)
    assert d["mean"] == pytest.approx(0.5) and all(np.isnan(d["ci95"]))
    assert _fmt(d, 2) == "0.50 ± 0.36"
    d = describe([0.2, 0.4, 0.9], n_boot=300)  # with resampling: core.stats' interval, unchanged
    assert d["ci95"] == list(bootstrap_ci([0.2, 0.4, 0.9], 300)[1:]) and _fmt(d, 2).startswith("0.50 ± 0.36 [")


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


# -- run-level comparisons, Holm, variance components, power (docs/method.md#statistics) ---------------------
HAND_A = {("r1", "s1", "i1"): 1.0, ("r1", "s1", "i2"): 3.0, ("r1", "s2", "i1"): 4.0,
          ("r2", "s1", "i1"): 0.0, ("r2", "s2", "i1"): 2.0, ("r2", "s2", "i2"): 2.0, ("r2", "s2", "i3"): 5.0}
ZERO = dict.fromkeys(HAND_A, 0.0)


def nested_data(rng, runs, subjects=12, images=2, sd_run=0.1, sd_subject=0.1, sd_image=0.1, effect=0.0,
                shared_subjects=False):
    """{(run, subject, image): d} from d = effect + u_run + u_subject + e (subjects shared by runs or not)."""
    common = rng.normal(0, sd_subject, subjects)
    out = {}
    for r in range(runs):
        u = rng.normal(0, sd_run)
        for s in range(subjects):
            v = common[s] if shared_subjects else rng.normal(0, sd_subject)
            for i in range(images):
                out[(f"r{r}", f"s{s}", f"i{i}")] = effect + u + v + rng.normal(0, sd_image)
    return out


def reference_hierarchical(diffs, n_boot, rng, level=0.95):
    """Loop-based two-stage bootstrap (runs, then subjects within each drawn run): the independent reference."""
    tree = {}
    for (r, s, _), d in diffs.items():
        tree.setdefault(r, {}).setdefault(s, []).append(d)
    runs = [np.array([np.mean(v) for v in subs.values()]) for subs in tree.values()]
    reps = np.empty(n_boot)
    for b in range(n_boot):
        drawn = [runs[j] for j in rng.integers(0, len(runs), len(runs))]
        reps[b] = np.mean([x[rng.integers(0, x.size, x.size)].mean() for x in drawn])
    return np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])


def test_run_level_point_estimate_by_hand():
    # run r1: s1 = mean(1, 3) = 2, s2 = 4 -> 3; run r2: s1 = 0, s2 = mean(2, 2, 5) = 3 -> 1.5; mean of runs 2.25
    stat = run_level_diff(HAND_A, ZERO, n_boot=200)
    assert stat.mean == 2.25 and stat.per_run == {"r1": 3.0, "r2": 1.5}  # not 17/7, the mean of the 7 images
    assert (stat.n_runs, stat.n_subjects, stat.unit) == (2, 2, UNIT_RUNS)
    assert stat.subject_only[0] == 2.25 and stat.stat == (stat.mean, stat.lo, stat.hi)
    assert run_level_diff(ZERO, HAND_A, n_boot=200).per_run == {"r1": -3.0, "r2": -1.5}  # a - b, not b - a
    three = {**HAND_A, ("r3", "s1", "i1"): 9.0}  # run means 3, 1.5, 9: the mean 4.5 (not the median 3)
    assert run_level_diff(three, dict.fromkeys(three, 0.0), n_boot=50).mean == 4.5
    # t over the run means 3 and 1.5: sd 1.5 / sqrt 2, se 0.75, t = 3 on 1 df: p = 1 - 2 atan(3) / pi
    assert stat.p_t == pytest.approx(1 - 2 * np.arctan(3.0) / np.pi, abs=1e-12)
    assert stat.t_ci == pytest.approx((2.25 - 12.706204736174707 * 0.75, 2.25 + 12.706204736174707 * 0.75))
    assert run_t([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.0) and run_t([0.0, 0.0]) == (0.0, 0.0, 1.0)
    assert all(np.isnan(run_t([0.3])))


def test_run_level_p_value_exact():
    # replicate <= 0 only when both drawn runs are r2 (1/4) and each draws s1 twice (1/4 each): P = 1/64
    stat = run_level_diff(HAND_A, ZERO, n_boot=40000, seed=3)
    assert stat.p == pytest.approx(2 / 64, abs=0.004)
    # one subject per run: replicates are 1, 2, 3 with P 1/4, 1/2, 1/4
    up = run_level_diff({("r1", "s", "i"): 1.0, ("r2", "s", "i"): 3.0}, {("r1", "s", "i"): 0.0, ("r2", "s", "i"): 0.0},
                        n_boot=999)
    assert up.p == 2 / 1000 and (up.lo, up.hi) == (1.0, 3.0)  # no replicate <= 0: p = 2 (0 + 1) / (B + 1)
    mixed = run_level_diff({("r1", "s", "i"): -1.0, ("r2", "s", "i"): 3.0}, {("r1", "s", "i"): 0.0, ("r2", "s", "i"): 0.0},
                           n_boot=20000)
    assert mixed.p == pytest.approx(0.5, abs=0.02)  # 2 P(replicate = -1)
    assert bootstrap_p(np.zeros(9)) == 1.0 and bootstrap_p(np.array([-1.0, 2.0, 3.0, 4.0])) == 2 * 2 / 5


def test_run_level_ci_matches_a_loop_reference():
    diffs = nested_data(np.random.default_rng(5), runs=4, subjects=9, sd_run=0.3, sd_subject=0.5)
    diffs = {k: v for k, v in diffs.items() if not (k[0] in ("r1", "r3") and k[1] in ("s0", "s1", "s2", "s3"))}
    stat = run_level_diff(diffs, dict.fromkeys(diffs, 0.0), n_boot=20000, seed=1)
    ref = reference_hierarchical(diffs, 10000, np.random.default_rng(9))
    assert stat.lo == pytest.approx(ref[0], abs=0.025) and stat.hi == pytest.approx(ref[1], abs=0.025)
    assert stat.hi - stat.lo > 0.3  # the tolerance is small against the width


def test_subject_only_ci_matches_scipy_over_subject_means():
    rng = np.random.default_rng(2)
    diffs = {("r", f"s{s}", f"i{i}"): rng.normal(0, 1) for s in range(40) for i in range(1 + s % 3)}
    stat = run_level_diff(diffs, dict.fromkeys(diffs, 0.0), n_boot=20000)
    tree = {}
    for (_, s, _), d in diffs.items():
        tree.setdefault(s, []).append(d)
    ref = subject_ci(tree, n_boot=20000, seed=4)
    assert stat.unit == UNIT_ONE_RUN and (stat.lo, stat.hi) == stat.subject_only[1:]
    assert stat.mean == pytest.approx(ref[0], abs=1e-12)
    assert stat.lo == pytest.approx(ref[1], abs=0.012) and stat.hi == pytest.approx(ref[2], abs=0.012)


def test_run_level_pairing_and_degenerate_inputs():
    a = {**HAND_A, ("r3", "s1", "i1"): 9.0, ("r1", "s3", "i1"): float("nan")}
    b = {**ZERO, ("r1", "s3", "i1"): 0.0, ("r9", "s9", "i9"): 5.0}
    stat = run_level_diff(a, b, n_boot=200)
    assert stat.mean == 2.25 and stat.n_runs == 2 and stat.n_subjects == 2  # r3 unpaired, the NaN dropped
    empty = run_level_diff({}, {}, n_boot=10)
    assert np.isnan(empty.mean) and empty.n_runs == 0 and empty.per_run == {}
    assert run_level_diff(HAND_A, ZERO, seed=4) == run_level_diff(HAND_A, ZERO, seed=4)
    with pytest.raises(ValueError, match="level"):
        run_level_diff(HAND_A, ZERO, level=95)
    with pytest.raises(ValueError, match="subjects"):
        run_level_diff(HAND_A, ZERO, subjects="flat")


def test_hierarchical_ci_is_wider_than_subject_only_when_runs_vary():
    diffs = nested_data(np.random.default_rng(1), runs=5, sd_run=0.3, sd_subject=0.05, sd_image=0.05, effect=0.1)
    stat = run_level_diff(diffs, dict.fromkeys(diffs, 0.0), n_boot=1000)
    assert stat.hi - stat.lo > 3 * (stat.subject_only[2] - stat.subject_only[1])
    same = nested_data(np.random.default_rng(1), runs=5, sd_run=0.0, sd_subject=0.3)
    flat = run_level_diff(same, dict.fromkeys(same, 0.0), n_boot=1000)
    # no run effect: two-stage resampling counts the within-run variance about twice (Davison & Hinkley), so
    # the interval is about sqrt(2) wider than the subject-only one, not more
    assert 1.1 < (flat.hi - flat.lo) / (flat.subject_only[2] - flat.subject_only[1]) < 1.8


def test_coverage_of_a_null_effect_with_run_noise():
    """Measured (200 datasets, 12 subjects x 2 images, SDs 0.1 run / subject / image, B = 400), share of 95 %
    CIs covering the true 0 at 3 / 5 / 8 runs. Subjects nested in runs: hierarchical 78 / 88 / 92 %, crossed
    83 / 90 / 95 %, t over runs 95 / 96 / 98 %, subject-only 40 / 44 / 45 %. Subjects shared by all runs (the
    study's design): hierarchical 70 / 83 / 86 %, crossed 79 / 89 / 93 %, t 93 / 90 / 91 %, subject-only
    34-39 %. Bootstrap p < 0.05 under the null (nested): 22 / 12 / 8 %; t: 6 / 4 / 3 %."""
    rng = np.random.default_rng(8)
    hier = fixed = crossed = t_cov = 0
    for _ in range(200):
        diffs = nested_data(rng, runs=8, shared_subjects=True)
        zero = dict.fromkeys(diffs, 0.0)
        stat = run_level_diff(diffs, zero, n_boot=300, seed=1)
        cross = run_level_diff(diffs, zero, n_boot=300, seed=1, subjects="crossed")
        hier += stat.lo <= 0 <= stat.hi
        fixed += stat.subject_only[1] <= 0 <= stat.subject_only[2]
        crossed += cross.lo <= 0 <= cross.hi
        t_cov += stat.t_ci[0] <= 0 <= stat.t_ci[1]
    assert hier / 200 > 0.8 and crossed / 200 > 0.88 and t_cov / 200 > 0.85 and fixed / 200 < 0.55


def test_with_three_runs_the_bootstrap_p_is_too_small_and_the_t_test_is_not():
    rng = np.random.default_rng(3)
    boot = t_test = 0
    for _ in range(200):
        diffs = nested_data(rng, runs=3)
        stat = run_level_diff(diffs, dict.fromkeys(diffs, 0.0), n_boot=300, seed=1)
        boot += stat.p < 0.05
        t_test += stat.p_t < 0.05
    assert boot / 200 > 0.12 and t_test / 200 < 0.1  # nominal 0.05


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=12), st.integers(1, 3),
       st.floats(-2, 2, allow_nan=False))
def test_run_level_laws(xs, runs, c):
    a = {(f"r{i % runs}", f"s{i % 4}", f"i{i}"): x for i, x in enumerate(xs)}
    b = {k: 0.5 * v - 0.1 for k, v in a.items()}
    same = run_level_diff(a, a, n_boot=200)
    assert (same.mean, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    ab, ba = run_level_diff(a, b, n_boot=200), run_level_diff(b, a, n_boot=200)
    assert ba.mean == pytest.approx(-ab.mean, abs=1e-12) and ba.p == ab.p
    assert ba.lo == pytest.approx(-ab.hi, abs=1e-9) and ba.hi == pytest.approx(-ab.lo, abs=1e-9)
    shifted = run_level_diff({k: v + c for k, v in a.items()}, b, n_boot=200)
    for x, y in ((shifted.mean, ab.mean), (shifted.lo, ab.lo), (shifted.hi, ab.hi)):
        assert x == pytest.approx(y + c, abs=1e-9)
    assert ab.lo <= ab.mean + 1e-9 <= ab.hi + 2e-9
    assert ba.p_t == ab.p_t or (np.isnan(ba.p_t) and np.isnan(ab.p_t))
    if ab.n_runs > 1:
        assert same.t_ci == (0.0, 0.0) and same.p_t == 1.0
        assert ba.t_ci == pytest.approx((-ab.t_ci[1], -ab.t_ci[0]), abs=1e-9)
        assert shifted.t_ci == pytest.approx((ab.t_ci[0] + c, ab.t_ci[1] + c), abs=1e-9)
    assert ab.n_runs == len({k[0] for k in a})
    if ab.p < 0.05:  # the p-value and the 95 % CI agree
        assert verdict(ab.stat) != "inconclusive"


def test_holm_against_a_hand_table():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.2, "e": 0.005, "f": float("nan")}
    # m = 5 finite: sorted e, a, c, b, d; times 5, 4, 3, 2, 1 = .025, .04, .09, .08, .2; running max -> b = .09
    adj = holm(p)
    for k, v in {"e": 0.025, "a": 0.04, "c": 0.09, "b": 0.09, "d": 0.2}.items():
        assert adj[k] == pytest.approx(v, abs=1e-15)
    assert np.isnan(adj["f"]) and list(adj) == list(p)
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0} and holm({"x": 0.02}) == {"x": 0.02}
    assert holm({}) == {}
    with pytest.raises(ValueError, match="'x'"):
        holm({"x": 1.5})


def test_holm_matches_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = np.random.default_rng(0).uniform(0, 0.2, 14)
    ours = holm({str(i): v for i, v in enumerate(p)})
    np.testing.assert_allclose([ours[str(i)] for i in range(14)], multipletests(p, method="holm")[1], atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=20))
def test_holm_laws(ps):
    adj = holm({str(i): p for i, p in enumerate(ps)})
    order = np.argsort(ps, kind="stable")
    vals = [adj[str(i)] for i in order]
    assert all(adj[str(i)] >= p - 1e-15 and adj[str(i)] <= 1.0 for i, p in enumerate(ps))
    assert all(x <= y for x, y in zip(vals, vals[1:]))  # monotone in the order of the raw p-values
    assert adj[str(order[0])] == pytest.approx(min(1.0, len(ps) * ps[order[0]]))  # Bonferroni at the first step


def test_verdict_p():
    assert verdict_p(0.1, 0.01) == "better" and verdict_p(-0.1, 0.01) == "worse"
    assert verdict_p(0.1, 0.01, higher_is_better=False) == "worse"
    assert verdict_p(-0.1, 0.01, higher_is_better=False) == "better"
    assert verdict_p(0.1, 0.05) == "inconclusive" and verdict_p(0.1, 0.049) == "better"
    assert verdict_p(0.1, 0.07, alpha=0.1) == "better" and verdict_p(0.0, 0.0) == "inconclusive"
    assert verdict_p(float("nan"), 0.01) == "inconclusive" and verdict_p(0.1, float("nan")) == "inconclusive"


def test_variance_components_one_way_by_hand():
    # balanced: groups (1, 3), (5, 9): MS_between = 25, MS_within = 5, n = 2 -> group (25 - 5) / 2 = 10
    vals = {("g1", "a"): 1.0, ("g1", "b"): 3.0, ("g2", "a"): 5.0, ("g2", "b"): 9.0}
    assert variance_components(vals, ["g", "e"]) == {"g": 10.0, "e": 5.0}
    # unbalanced: the textbook estimator (MS_b - MS_w) / n0 with n0 = (N - sum n_i^2 / N) / (a - 1)
    groups = {"g1": [1.0, 3.0], "g2": [5.0], "g3": [6.0, 8.0, 13.0], "g4": [0.0, 2.0]}
    y = np.concatenate([np.array(v) for v in groups.values()])
    n = np.array([len(v) for v in groups.values()])
    m = np.array([np.mean(v) for v in groups.values()])
    ms_b = np.sum(n * (m - y.mean()) ** 2) / (len(n) - 1)
    ms_w = sum(np.sum((np.array(v) - np.mean(v)) ** 2) for v in groups.values()) / (y.size - len(n))
    n0 = (y.size - np.sum(n ** 2) / y.size) / (len(n) - 1)
    got = variance_components({(g, str(i)): v for g, vs in groups.items() for i, v in enumerate(vs)}, ["g", "e"])
    assert got["e"] == pytest.approx(ms_w) and got["g"] == pytest.approx((ms_b - ms_w) / n0)


def test_variance_components_balanced_three_levels_equal_anova():
    a, b, n = 6, 4, 3
    y = np.random.default_rng(4).normal(size=(a, b, n)) + np.arange(a)[:, None, None] * 0.3
    ms_a = b * n * np.sum((y.mean((1, 2)) - y.mean()) ** 2) / (a - 1)
    ms_b = n * np.sum((y.mean(2) - y.mean((1, 2))[:, None]) ** 2) / (a * (b - 1))
    ms_e = np.sum((y - y.mean(2, keepdims=True)) ** 2) / (a * b * (n - 1))
    vals = {(f"r{i}", f"s{j}", f"k{k}"): y[i, j, k] for i in range(a) for j in range(b) for k in range(n)}
    got = variance_components(vals, ("run", "subject", "image"))
    assert list(got) == ["run", "subject", "image"]
    assert got["image"] == pytest.approx(ms_e) and got["subject"] == pytest.approx(max(0, (ms_b - ms_e) / n))
    assert got["run"] == pytest.approx((ms_a - ms_b) / (b * n))


def test_variance_components_recover_simulated_components():
    truth = {"run": 0.04, "subject": 0.01, "image": 0.0025}
    rng = np.random.default_rng(11)
    vals = {}
    for r in range(60):
        u = rng.normal(0, truth["run"] ** 0.5)
        for s in range(10 + r % 5):  # unbalanced
            v = rng.normal(0, truth["subject"] ** 0.5)
            for i in range(2 + s % 3):
                vals[(r, s, i)] = 0.5 + u + v + rng.normal(0, truth["image"] ** 0.5)
    got = variance_components(vals, list(truth))
    assert got["run"] == pytest.approx(truth["run"], rel=0.3)
    assert got["subject"] == pytest.approx(truth["subject"], rel=0.15)
    assert got["image"] == pytest.approx(truth["image"], rel=0.1)


def test_variance_components_clipping_and_unidentifiable_levels():
    # equal group means: the group estimate (0 - MS_w) / n is negative -> clipped to 0
    got = variance_components({("g1", "a"): 0.0, ("g1", "b"): 1.0, ("g2", "a"): 1.0, ("g2", "b"): 0.0}, ["g", "e"])
    assert got == {"g": 0.0, "e": 0.5}
    # one run: its variance cannot be estimated; the rest is the one-way analysis
    one = variance_components({("r", "g1", "a"): 1.0, ("r", "g1", "b"): 3.0, ("r", "g2", "a"): 5.0,
                               ("r", "g2", "b"): 9.0, ("r", "g3", "a"): float("nan")}, ["run", "g", "e"])
    assert np.isnan(one["run"]) and (one["g"], one["e"]) == (10.0, 5.0)
    with pytest.raises(ValueError, match="levels"):
        variance_components({("a",): 1.0}, ["x", "y"])


def test_minimum_detectable_effect_by_hand():
    # t_{0.975, 4} = 2.7764451051977934, t_{0.8, 4} = 0.9409645772351816
    assert minimum_detectable_effect(1.0, 5) == pytest.approx((2.7764451051977934 + 0.9409645772351816) / 5 ** 0.5)
    # alpha' = 0.05 / 3, power 0.9, 8 runs: t_{1-0.05/6, 7} = 3.1275522742463706, t_{0.9, 7} = 1.4149239276505086
    got = minimum_detectable_effect(0.5, 8, power=0.9, n_comparisons=3)
    assert got == pytest.approx((3.1275522742463706 + 1.4149239276505086) * 0.5 / 8 ** 0.5)
    assert np.isnan(minimum_detectable_effect(1.0, 1))
    mdes = [minimum_detectable_effect(0.1, n) for n in (3, 5, 8, 12)]
    assert all(x > y for x, y in zip(mdes, mdes[1:]))


def test_design_mde_adds_the_three_components():
    comps = {"run": 0.01, "subject": 0.04, "image": 0.02}
    # one run's mean difference: 0.01 + 0.04 / 10 + 0.02 / (10 * 2) = 0.015
    want = minimum_detectable_effect(0.015 ** 0.5, 5, n_comparisons=14)
    assert design_mde(comps, 5, 10, 2, n_comparisons=14) == pytest.approx(want)
    assert design_mde({"seed": 0.01, "subj": 0.04, "img": 0.02}, 5, 10, 2, n_comparisons=14) == pytest.approx(want)
    assert design_mde({"image": 0.02, "run": 0.01, "subject": 0.04}, 5, 10, 2, n_comparisons=14) == pytest.approx(want)
    with pytest.raises(ValueError, match="components"):
        design_mde({"run": 0.01}, 5, 10, 2)
