"""Confidence intervals used by every report: percentile bootstrap (``scipy.stats.bootstrap``) of a mean,
clustered by subject, and paired differences with a verdict. Conventions: docs/method.md#statistics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Stat = tuple[float, float, float]  # (mean, lo, hi)


def bootstrap_ci(values: Iterable[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Stat:
    """Mean and percentile-bootstrap CI of the mean over finite ``values``.

    No value: (nan, nan, nan). One value, or all equal: (v, v, v) — there is nothing to resample.
    """
    from scipy.stats import bootstrap

    x = np.asarray(list(values), np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
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
    """Mean of ``a[k] - b[k]`` over the keys both have (images, or (image, seed) pairs) with its bootstrap CI."""
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
