"""Confidence intervals, tests and power for every report. Conventions and sources: docs/method.md#statistics.

* per-checkpoint intervals: percentile bootstrap of a mean (``scipy.stats.bootstrap``), clustered by subject,
  and paired differences with a CI verdict (:func:`bootstrap_ci`, :func:`subject_ci`, :func:`paired_diff_ci`);
* method comparisons at the level of training runs: a hierarchical bootstrap that resamples runs, then
  subjects within each run (:func:`run_level_diff`), Holm's correction of a family (:func:`holm`) and a
  p-value verdict (:func:`verdict_p`);
* noise and design: nested variance components (:func:`variance_components`) and the minimum detectable
  effect of a paired run-level comparison (:func:`minimum_detectable_effect`, :func:`design_mde`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Stat = tuple[float, float, float]  # (mean, lo, hi)
NAN = float("nan")
UNIT_RUNS = "training runs (seeds), then subjects within each run"
UNIT_CROSSED = "training runs (seeds) and subjects, crossed"
UNIT_ONE_RUN = "subjects within one training run (run-to-run variation not measured)"


def bootstrap_ci(values: Iterable[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Stat:
    """Mean and percentile-bootstrap CI of the mean over finite ``values``.

    No value: (nan, nan, nan). One value, or all equal: (v, v, v) — there is nothing to resample.
    ``n_boot`` <= 0 (no resampling asked for, e.g. ``negdpo evaluate --bootstrap 0``): (mean, nan, nan).
    """
    from scipy.stats import bootstrap

    x = np.asarray(list(values), np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return NAN, NAN, NAN
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    if n_boot <= 0:
        return mean, NAN, NAN
    res = bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def cluster_means(values: Mapping[str, Iterable[float]]) -> np.ndarray:
    """One value per cluster (e.g. subject): the mean of its finite values; empty clusters are dropped."""
    out = []
    for vals in values.values():
        v = np.asarray(list(vals), np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            out.append(v.mean())
    return np.asarray(out, np.float64)


def subject_ci(values: Mapping[str, Iterable[float]], n_boot: int = 2000, seed: int = 0) -> Stat:
    """Mean over subjects (each subject = mean of its images) and a 95% bootstrap CI over subjects."""
    return bootstrap_ci(cluster_means(values), n_boot, seed)


def paired_diff_ci(a: Mapping[str, float], b: Mapping[str, float], n_boot: int = 2000, seed: int = 0) -> Stat:
    """Mean of ``a[k] - b[k]`` over the keys both have (images, or (image, seed) pairs) with its bootstrap CI.

    A per-checkpoint number: the keys are treated as independent (see :func:`run_level_diff` for methods)."""
    keys = sorted(set(a) & set(b))
    return bootstrap_ci([a[k] - b[k] for k in keys], n_boot, seed)


def verdict(stat: Stat, higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the CI of a difference excludes 0, else ``inconclusive``."""
    _, lo, hi = stat
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0.0 <= hi:
        return "inconclusive"
    return "better" if (lo > 0) == higher_is_better else "worse"


def fmt_ci(stat: Stat, digits: int = 3) -> str:
    m, lo, hi = stat
    if not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# -- comparisons of methods at the level of training runs ---------------------------------------------
@dataclass(frozen=True)
class RunLevelStat:
    """A paired difference a - b generalised over training runs and subjects (docs/method.md#statistics)."""

    mean: float  # per run: mean over its subjects (subject = mean of its images); then the mean over runs
    lo: float  # hierarchical percentile-bootstrap CI (runs, then subjects within each drawn run)
    hi: float
    p: float  # two-sided bootstrap p-value of "mean difference = 0"
    per_run: dict[str, float] = field(default_factory=dict)  # each run's mean difference
    n_runs: int = 0
    n_subjects: int = 0  # distinct subjects
    subject_only: Stat = (NAN, NAN, NAN)  # SECONDARY: subjects resampled with the runs fixed
    unit: str = UNIT_RUNS
    # CHECK for few runs: paired t over the run means (df = n_runs - 1); NaN below 2 runs
    t_ci: tuple[float, float] = (NAN, NAN)
    p_t: float = NAN

    @property
    def stat(self) -> Stat:
        return self.mean, self.lo, self.hi


def _subject_table(a: Mapping, b: Mapping) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Runs, distinct subjects, the (run x subject) matrix of subject mean differences (NaN = not scored)
    and its presence mask. Keys (run, subject, image) both maps have; non-finite differences dropped."""
    cells: dict[tuple[str, str], list[float]] = {}
    for key in sorted(a.keys() & b.keys(), key=lambda k: tuple(map(str, k))):  # fixed order: bit-reproducible
        run, subject, _ = key
        d = float(a[key]) - float(b[key])
        if math.isfinite(d):
            cells.setdefault((str(run), str(subject)), []).append(d)
    runs = sorted({r for r, _ in cells})
    subjects = sorted({s for _, s in cells})
    ri, si = {r: i for i, r in enumerate(runs)}, {s: i for i, s in enumerate(subjects)}
    table = np.full((len(runs), len(subjects)), NAN)
    for (r, s), ds in cells.items():
        table[ri[r], si[s]] = float(np.mean(ds))
    return runs, subjects, table, np.isfinite(table)


def _boot_means(table: np.ndarray, present: np.ndarray, run_idx: np.ndarray, rng: np.random.Generator,
                crossed: bool) -> np.ndarray:
    """Replicate means for drawn runs ``run_idx`` (B x R): each drawn run's subjects are resampled with
    replacement (nested: independently per drawn run, among its own subjects; crossed: one draw of the
    distinct subjects shared by all runs), averaged, and the run means averaged."""
    n_rep, n_run = run_idx.shape
    if crossed:
        sidx = rng.integers(0, table.shape[1], (n_rep, 1, table.shape[1]))
        vals = table[run_idx[..., None], sidx]
        ok = present[run_idx[..., None], sidx]
        run_means = np.where(ok, vals, 0.0).sum(-1) / np.maximum(ok.sum(-1), 1)
        run_means = np.where(ok.any(-1), run_means, NAN)
        return np.nanmean(run_means, -1)
    # nested: the k-th subject column of a run is its k-th present subject
    order = np.argsort(~present, axis=1, kind="stable")
    packed = np.take_along_axis(np.where(present, table, 0.0), order, 1)
    counts = present.sum(1)
    cnt = counts[run_idx][..., None]  # (B, R, 1)
    width = int(counts.max())
    sidx = np.minimum((rng.random((n_rep, n_run, width)) * cnt).astype(np.int64), cnt - 1)
    vals = packed[run_idx[..., None], sidx]
    used = np.arange(width) < cnt
    return (np.where(used, vals, 0.0).sum(-1) / cnt[..., 0]).mean(-1)


def _replicates(table: np.ndarray, present: np.ndarray, n_boot: int, rng: np.random.Generator,
                resample_runs: bool, crossed: bool, chunk: int = 4_000_000) -> np.ndarray:
    n_run, n_sub = table.shape
    step = max(1, chunk // max(1, n_run * n_sub))
    out = []
    for start in range(0, n_boot, step):
        n = min(step, n_boot - start)
        run_idx = (rng.integers(0, n_run, (n, n_run)) if resample_runs
                   else np.broadcast_to(np.arange(n_run), (n, n_run)))
        out.append(_boot_means(table, present, run_idx, rng, crossed))
    return np.concatenate(out)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0": ``min(1, 2 min(P*(t <= 0), P*(t >= 0)))`` with
    each share counted as ``(#hits + 1) / (B + 1)`` (the replicate-as-a-sample correction)."""
    b = replicates.size
    le = (np.count_nonzero(replicates <= 0.0) + 1) / (b + 1)
    ge = (np.count_nonzero(replicates >= 0.0) + 1) / (b + 1)
    return float(min(1.0, 2.0 * min(le, ge)))


def run_t(per_run: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, p) of the one-sample t test of the run means against 0 (df = runs - 1); NaN below 2 runs.
    Runs that all agree exactly give a zero-width interval and p = 1 (mean 0) or 0."""
    x = np.asarray(per_run, np.float64)
    if x.size < 2:
        return NAN, NAN, NAN
    from scipy.stats import t

    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(x.size)
    if se == 0.0:
        return mean, mean, 1.0 if mean == 0.0 else 0.0
    half = float(t.ppf(0.5 + level / 2.0, x.size - 1)) * se
    return mean - half, mean + half, float(2.0 * t.sf(abs(mean) / se, x.size - 1))


def run_level_diff(a: Mapping[tuple[str, str, str], float], b: Mapping[tuple[str, str, str], float], *,
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95, subjects: str = "nested") -> RunLevelStat:
    """Paired difference a - b over keys (run, subject, image) both have, generalised over training runs.

    Point estimate: per run, the mean over its subjects of each subject's mean image difference; then the
    mean over runs (runs and subjects weigh equally). CI and p: hierarchical percentile bootstrap — draw
    runs with replacement, then subjects with replacement within each drawn run (``subjects="crossed"``:
    one draw of subjects shared by the drawn runs, for test sets common to all runs). With one run, the CI
    is the subject-level one and ``unit`` says so. ``subject_only`` (secondary) resamples subjects with the
    runs fixed. ``t_ci`` / ``p_t``: the paired t test over the run means (:func:`run_t`), the check for few
    runs, where the percentile bootstrap is too narrow. Deterministic given ``seed``. docs/method.md#statistics
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level}: must be in (0, 1)")
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot}: must be >= 1")
    if subjects not in ("nested", "crossed"):
        raise ValueError(f"subjects '{subjects}': nested or crossed")
    runs, subject_ids, table, present = _subject_table(a, b)
    if not runs:
        return RunLevelStat(NAN, NAN, NAN, NAN, {}, 0, 0, (NAN, NAN, NAN), UNIT_RUNS)
    run_means = np.where(present, table, 0.0).sum(1) / present.sum(1)
    mean = float(run_means.mean())
    crossed = subjects == "crossed"
    seq = np.random.SeedSequence(seed)
    rng_h, rng_s = (np.random.default_rng(s) for s in seq.spawn(2))
    q = [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0]
    fixed = _replicates(table, present, n_boot, rng_s, resample_runs=False, crossed=crossed)
    s_lo, s_hi = np.quantile(fixed, q)
    if len(runs) > 1:
        reps = _replicates(table, present, n_boot, rng_h, resample_runs=True, crossed=crossed)
        unit = UNIT_CROSSED if crossed else UNIT_RUNS
    else:
        reps, unit = fixed, UNIT_ONE_RUN
    lo, hi = np.quantile(reps, q)
    t_lo, t_hi, p_t = run_t(run_means, level)
    return RunLevelStat(mean=mean, lo=float(lo), hi=float(hi), p=bootstrap_p(reps),
                        per_run={r: float(m) for r, m in zip(runs, run_means)}, n_runs=len(runs),
                        n_subjects=len(subject_ids), subject_only=(mean, float(s_lo), float(s_hi)), unit=unit,
                        t_ci=(t_lo, t_hi), p_t=p_t)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values of a family: sorted ascending, ``p_(i) (m - i + 1)`` made monotone
    by a running maximum and capped at 1. Non-finite p-values stay NaN and are not counted in ``m``."""
    out = {k: NAN for k in pvalues}
    finite = sorted(((float(p), k) for k, p in pvalues.items() if math.isfinite(float(p))), key=lambda t: t[0])
    for p, k in finite:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of '{k}' is {p}: must be in [0, 1]")
    m, running = len(finite), 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def verdict_p(mean: float, p_adjusted: float, alpha: float = 0.05, higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the (family-adjusted) p-value is below ``alpha``, by the sign of ``mean``
    and the metric's direction; else ``inconclusive``."""
    if not (math.isfinite(mean) and math.isfinite(p_adjusted)) or p_adjusted >= alpha or mean == 0.0:
        return "inconclusive"
    return "better" if (mean > 0.0) == higher_is_better else "worse"


# -- noise and design ---------------------------------------------------------------------------------
def variance_components(values: Mapping[tuple[str, ...], float], levels: Sequence[str]) -> dict[str, float]:
    """Nested random-effects variance components by the ANOVA method of moments (docs/method.md#statistics).

    ``values``: {key: y} with one key entry per level, outermost first (e.g. ("seed", "subject", "image"));
    a level is nested in the one before it (a subject of seed 0 and the same subject of seed 1 are two
    groups). For each level the sum of squares of its group means about their parent's means is equated
    to its expectation under the nested model (valid for unbalanced data; Henderson's method I), and the
    triangular system is solved; for balanced data this is the classical ANOVA estimator, which equals REML
    when no estimate is negative. Negative estimates are clipped to 0. A level with one group per parent
    cannot be separated from its parent: NaN (its variance stays in the parent's). Non-finite values dropped.
    """
    levels = list(levels)
    k = len(levels)
    if k == 0:
        raise ValueError("variance_components: no levels")
    keys, ys = [], []
    for key, v in values.items():
        key = tuple(key) if isinstance(key, tuple) else (key,)
        if len(key) != k:
            raise ValueError(f"key {key!r} has {len(key)} entries, levels {levels} need {k}")
        if math.isfinite(float(v)):
            keys.append(key)
            ys.append(float(v))
    if not keys:
        return dict.fromkeys(levels, NAN)
    y = np.asarray(ys)
    n_obs = y.size
    codes = [np.zeros(n_obs, np.int64)]  # codes[i]: group of each observation at prefix length i (0 = all)
    for i in range(1, k + 1):
        ids: dict[tuple, int] = {}
        codes.append(np.asarray([ids.setdefault(key[:i], len(ids)) for key in keys], np.int64))
    counts = [np.bincount(c) for c in codes]
    means = [np.bincount(c, y) / n for c, n in zip(codes, counts)]
    ss = np.asarray([np.sum((means[i][codes[i]] - means[i - 1][codes[i - 1]]) ** 2) for i in range(1, k + 1)])

    def t(outer: int, j: int) -> float:
        """Sum over groups g at level ``outer`` of sum_{h at level j} |h ∩ g|^2 / |g|."""
        if j <= outer:
            return float(n_obs)
        first = np.unique(codes[j], return_index=True)[1]  # one observation of each level-j group
        anc = codes[outer][first]
        return float(np.sum(np.bincount(anc, counts[j] ** 2.0, minlength=counts[outer].size) / counts[outer]))

    coef = np.asarray([[t(i, j) - t(i - 1, j) for j in range(1, k + 1)] for i in range(1, k + 1)])
    ok = np.diag(coef) > 1e-9 * n_obs
    est = np.full(k, NAN)
    if ok.any():
        est[ok] = np.linalg.solve(coef[np.ix_(ok, ok)], ss[ok])
    return {lev: (max(0.0, float(v)) if math.isfinite(v) else NAN) for lev, v in zip(levels, est)}


def minimum_detectable_effect(sd_run: float, n_runs: int, *, alpha: float = 0.05, power: float = 0.8,
                              n_comparisons: int = 1) -> float:
    """Smallest true mean difference a paired comparison over ``n_runs`` runs detects with ``power``:
    ``(t_{1-alpha'/2, n-1} + t_{power, n-1}) sd_run / sqrt(n)`` with ``alpha' = alpha / n_comparisons``
    (Holm's first step, a Bonferroni bound). ``sd_run``: SD of one run's mean difference. NaN below 2 runs.
    """
    if n_runs < 2 or n_comparisons < 1:
        return NAN
    from scipy.stats import t

    df = n_runs - 1
    crit = t.ppf(1.0 - alpha / n_comparisons / 2.0, df) + t.ppf(power, df)
    return float(crit * sd_run / math.sqrt(n_runs))


def design_mde(components: Mapping[str, float], n_runs: int, n_subjects: int, n_images: int, **kw) -> float:
    """Minimum detectable effect of a paired run-level difference for a design (runs, subjects per run,
    images per subject), from the variance components of the DIFFERENCE: ``components`` holds three
    entries, (run, subject, image) by those names if present, else in order (outermost first, as
    :func:`variance_components` returns them). ``kw`` goes to :func:`minimum_detectable_effect`."""
    if {"run", "subject", "image"} <= set(components):
        v_run, v_sub, v_img = (float(components[n]) for n in ("run", "subject", "image"))
    elif len(components) == 3:
        v_run, v_sub, v_img = (float(v) for v in components.values())
    else:
        raise ValueError(f"design_mde: components {list(components)}: need (run, subject, image)")
    var_run = v_run + v_sub / n_subjects + v_img / (n_subjects * n_images)
    return minimum_detectable_effect(math.sqrt(var_run), n_runs, **kw)
