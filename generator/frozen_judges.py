"""Two frozen judges of generated negatives, independent of pair building and generator training.

* :class:`LesionDetector` — a residual-lesion detector: P(lesion) in the region of a lesion mask.
  Trained on the ``pretrain`` pool only: the region of each pool positive (label 1) against the same
  region of its healthy twin (label 0), plus borrowed lesion masks placed at random places of healthy
  pool scans (label 0, so "a region was chosen" carries no signal). Its features describe how the region
  stands out from its surroundings (intensity shift, quantiles, edge at the boundary) — not how smooth it
  is, so a blurry repair is not called a lesion for its blur alone (that is the realism judge's job).
* :class:`RealismJudge` — a real-vs-generated two-sample classifier test: fitted on the pool (real twins vs
  a generator's repairs of the pool positives, same regions), then the AUC of its P(generated) on held-out
  repairs vs their real twins, 0.5 = indistinguishable, with a subject-clustered bootstrap CI.

Both are a standardised logistic regression (scikit-learn, deterministic) on hand-made region features;
the fitted numbers are stored as arrays (``.npz``, no pickle) plus a JSON header. The pair-building judges
(:mod:`negdpo.preference.pairs.judges`) are a different thing and are not used here.

Formulas: docs/method.md#frozen-judges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPAINT_DILATION = 2  # px: the region judged is the lesion mask dilated like the repaint mask of the study
FEATURE_VERSION = 1
_EPS = 0.01

# column names of region_features (the lesion detector uses LESION_FEATURES, the realism judge all)
FEATURES = ("z_mean_lesion", "z_mean_band", "abs_z_mean_lesion", "z_q10", "z_q50", "z_q90", "abs_z_q10",
            "abs_z_q90", "ks", "edge_band", "edge_lesion", "log_std_lesion", "log_std_band", "log_hp1_lesion",
            "log_hp1_band", "log_hp2_lesion", "log_grad_lesion", "log_grad_band", "log_hp1_lesion_cv",
            "step", "abs_step", "step_abs", "step_sign")
LESION_FEATURES = ("z_mean_lesion", "z_mean_band", "abs_z_mean_lesion", "z_q10", "z_q50", "z_q90", "abs_z_q10",
                   "abs_z_q90", "ks", "edge_band", "edge_lesion", "step", "abs_step", "step_abs", "step_sign")


def _gray(image: np.ndarray) -> np.ndarray:
    from negdpo.core.imageio import to_gray

    return np.asarray(to_gray(np.asarray(image, np.float32)), np.float64)


def _log_ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.log((a.mean() + _EPS) / (b.mean() + _EPS)))


def region_features(image: np.ndarray, mask: np.ndarray, dilate: int = REPAINT_DILATION) -> np.ndarray:
    """Features of the region of ``mask`` in ``image`` against a ring around it (one vector, len(FEATURES)).

    Bands by taxicab distance ``d`` to the lesion mask L: lesion ``L``; band ``0 < d <= dilate`` (the rest
    of the repaint mask, where a lesion's soft edge or a paste-back seam lives); ring
    ``dilate < d <= dilate + w`` with ``w = max(3, round(sqrt(|L| / pi) / 2))``. ``z`` = (value - ring
    mean) / (ring std + 0.01); ``edge_*`` = mean gradient magnitude (Gaussian, sigma 1) in the band /
    lesion over the ring's, log; ``hp1`` = |x - G_1 x|, ``hp2`` = |G_1 x - G_3 x| (texture), ``ks`` =
    the two-sample Kolmogorov-Smirnov statistic of lesion vs ring intensities.
    """
    from scipy import ndimage

    img = _gray(image)
    lesion = np.asarray(mask, bool)
    if lesion.shape != img.shape or not lesion.any():
        raise ValueError(f"region_features needs a non-empty mask of the image's shape {img.shape}, "
                         f"got {lesion.shape} with {int(lesion.sum())} pixels")
    w = max(3, int(round(np.sqrt(lesion.sum() / np.pi) / 2)))
    ys, xs = np.nonzero(lesion)
    pad = dilate + w + 8
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, img.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, img.shape[1])
    win, les = img[y0:y1, x0:x1], lesion[y0:y1, x0:x1]
    dist = ndimage.distance_transform_cdt(~les, metric="taxicab")
    band = (dist > 0) & (dist <= dilate)
    ring = (dist > dilate) & (dist <= dilate + w)
    if not ring.any():  # a mask filling the image: no surroundings to compare with
        ring = ~les
    if not band.any():
        band = les
    smooth1 = ndimage.gaussian_filter(win, 1.0)
    hp1 = np.abs(win - smooth1)
    hp2 = np.abs(smooth1 - ndimage.gaussian_filter(win, 3.0))
    grad = ndimage.gaussian_gradient_magnitude(win, 1.0)
    r, inner = win[ring], win[les]
    mu, s = r.mean(), r.std() + _EPS
    q_in, q_r = np.quantile(inner, (0.1, 0.5, 0.9)), np.quantile(r, (0.1, 0.5, 0.9))
    zq = (q_in - q_r) / s
    z_lesion, z_band = (inner.mean() - mu) / s, (win[band].mean() - mu) / s
    r_sorted, in_sorted = np.sort(r), np.sort(inner)
    grid = np.concatenate([r_sorted, in_sorted])
    ks = float(np.max(np.abs(np.searchsorted(r_sorted, grid, "right") / r.size
                             - np.searchsorted(in_sorted, grid, "right") / inner.size)))
    # step across the boundary: each inner-rim pixel of L against its nearest pixel just outside the repaint band
    din = ndimage.distance_transform_cdt(les, metric="taxicab")
    inner_rim = les & (din >= 2) & (din <= 3)
    if not inner_rim.any():
        inner_rim = les
    outer_rim = (dist > dilate) & (dist <= dilate + 2)
    _, (iy, ix) = ndimage.distance_transform_edt(~outer_rim, return_indices=True)
    step_px = smooth1[inner_rim] - smooth1[iy[inner_rim], ix[inner_rim]]
    cv_in = hp1[les].mean() / (abs(inner.mean()) + _EPS)
    cv_r = hp1[ring].mean() / (abs(mu) + _EPS)
    values = {
        "z_mean_lesion": z_lesion, "z_mean_band": z_band, "abs_z_mean_lesion": abs(z_lesion),
        "z_q10": zq[0], "z_q50": zq[1], "z_q90": zq[2], "abs_z_q10": abs(zq[0]), "abs_z_q90": abs(zq[2]), "ks": ks,
        "edge_band": _log_ratio(grad[band], grad[ring]), "edge_lesion": _log_ratio(grad[les], grad[ring]),
        "log_std_lesion": float(np.log((inner.std() + _EPS) / s)),
        "log_std_band": float(np.log((win[band].std() + _EPS) / s)),
        "log_hp1_lesion": _log_ratio(hp1[les], hp1[ring]), "log_hp1_band": _log_ratio(hp1[band], hp1[ring]),
        "log_hp2_lesion": _log_ratio(hp2[les], hp2[ring]),
        "log_grad_lesion": _log_ratio(grad[les], grad[ring]), "log_grad_band": _log_ratio(grad[band], grad[ring]),
        "log_hp1_lesion_cv": float(np.log((cv_in + _EPS) / (cv_r + _EPS))),
        "step": step_px.mean() / s, "abs_step": abs(step_px.mean()) / s, "step_abs": np.abs(step_px).mean() / s,
        "step_sign": abs(np.sign(step_px).mean()),
    }
    return np.array([values[k] for k in FEATURES], np.float64)


def feature_matrix(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], columns: Sequence[str] = FEATURES
                   ) -> np.ndarray:
    """(N, len(columns)) region features of each (image, mask)."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    idx = [FEATURES.index(c) for c in columns]
    rows = [region_features(im, m)[idx] for im, m in zip(images, masks)]
    return np.asarray(rows, np.float64).reshape(len(rows), len(idx))


@dataclass
class _Linear:
    """Standardised logistic regression kept as plain arrays: P = sigmoid(((x - mean) / scale) . coef + b)."""

    columns: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, columns: Sequence[str], c: float, seed: int) -> _Linear:
        from sklearn.linear_model import LogisticRegression

        if len(set(np.asarray(y).tolist())) != 2:
            raise ValueError("a judge needs examples of both classes to fit")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed).fit((x - mean) / scale, y)
        return cls(tuple(columns), mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))

    def proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        return expit(((x - self.mean) / self.scale) @ self.coef + self.intercept)

    def save(self, directory: Path, name: str, header: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / f"{name}.npz", mean=self.mean, scale=self.scale, coef=self.coef,
                 intercept=np.array([self.intercept]))
        (directory / f"{name}.json").write_text(json.dumps(
            {**header, "columns": list(self.columns), "feature_version": FEATURE_VERSION}, indent=1))

    @classmethod
    def load(cls, directory: Path, name: str) -> tuple[_Linear, dict]:
        header = json.loads((directory / f"{name}.json").read_text())
        if header.get("feature_version") != FEATURE_VERSION:
            raise ValueError(f"{directory / name}.json: feature version {header.get('feature_version')}, "
                             f"this code computes version {FEATURE_VERSION}; refit the judge")
        with np.load(directory / f"{name}.npz", allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k], np.float64) for k in ("mean", "scale", "coef", "intercept")}
        return cls(tuple(header["columns"]), arrays["mean"], arrays["scale"], arrays["coef"],
                   float(arrays["intercept"][0])), header


LinearJudge = _Linear  # the same classifier, for judges fitted elsewhere (preference.pairs.train_judges)


def _subject(name: str) -> str:
    """``mri_0003_1.png`` -> ``mri_0003`` (as ``negdpo.study.data.subject_of``)."""
    return Path(name).stem.rsplit("_", 1)[0]


def _place_mask(mask: np.ndarray, image: np.ndarray, rng: np.random.Generator, tries: int = 30
                ) -> np.ndarray | None:
    """``mask`` shifted to a random place of ``image``'s foreground (>= 90% of it on pixels > 0.05)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    fg = _gray(image) > 0.05
    for _ in range(tries):
        dy = int(rng.integers(-ys.min(), h - ys.max()))
        dx = int(rng.integers(-xs.min(), w - xs.max()))
        if fg[ys + dy, xs + dx].mean() >= 0.9:
            out = np.zeros_like(mask, dtype=bool)
            out[ys + dy, xs + dx] = True
            return out
    return None


class LesionDetector:
    """Residual-lesion detector: P(lesion) in the region of a lesion mask. Fit on the ``pretrain`` pool only."""

    NAME = "lesion_detector"

    def __init__(self, c: float = 1.0, seed: int = 0, random_per_positive: float = 1.0,
                 require_split: str | None = "pretrain") -> None:
        self.c, self.seed, self.random_per_positive, self.require_split = c, seed, random_per_positive, require_split
        self.model: _Linear | None = None
        self.info: dict = {}

    def fit(self, scans: Sequence) -> LesionDetector:
        """Positives (region, label 1) vs their twins (same region, label 0) and random healthy regions (label 0).

        ``scans``: :class:`negdpo.core.scans.Scan` objects of the pool; positives need a twin. Scans of another
        split than ``require_split`` are refused (the judge must never see an evaluation subject).
        """
        if self.require_split is not None:
            bad = sorted({s.split for s in scans} - {self.require_split})
            if bad:
                raise ValueError(f"LesionDetector trains on the '{self.require_split}' pool only; got scans of "
                                 f"split(s) {bad}")
        positives = [s for s in scans if s.positive and s.twin is not None]
        if not positives:
            raise ValueError("LesionDetector.fit needs positives with healthy twins")
        healthy = [s.twin for s in positives] + [s.image for s in scans if not s.positive]
        rng = np.random.default_rng(self.seed)
        images, masks, labels = [], [], []
        for s in positives:
            images += [s.image, s.twin]
            masks += [s.mask, s.mask]
            labels += [1, 0]
        for _ in range(int(round(self.random_per_positive * len(positives)))):
            img = healthy[int(rng.integers(len(healthy)))]
            placed = _place_mask(positives[int(rng.integers(len(positives)))].mask, img, rng)
            if placed is not None:
                images.append(img)
                masks.append(placed)
                labels.append(0)
        x = feature_matrix(images, masks, LESION_FEATURES)
        self.model = _Linear.fit(x, np.asarray(labels), LESION_FEATURES, self.c, self.seed)
        self.info = {"n_positive": len(positives), "n_negative": len(labels) - len(positives),
                     "n_random_regions": len(labels) - 2 * len(positives), "c": self.c, "seed": self.seed,
                     "train_split": self.require_split}
        return self

    def predict_proba(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        """P(lesion) in the region of each mask (the lesion mask of the source scan)."""
        if self.model is None:
            raise RuntimeError("LesionDetector is not fitted (call fit or load)")
        return self.model.proba(feature_matrix(images, masks, self.model.columns))

    def lesion_free_rate(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float = 0.5
                         ) -> float:
        """Share of images judged lesion-free (P(lesion) < threshold)."""
        return float(np.mean(self.predict_proba(images, masks) < threshold))

    def accuracy_on(self, scans: Sequence, threshold: float = 0.5, n_boot: int = 2000, seed: int = 0) -> dict:
        """Accuracy on real positives (should be called lesion) vs their twins (lesion-free), same regions.

        Also ``sensitivity`` (positives called lesion), ``specificity`` (twins called lesion-free) and a
        95% bootstrap CI of the accuracy over subjects (``negdpo.core.stats.subject_ci``).
        """
        from negdpo.core.stats import subject_ci

        pos = [s for s in scans if s.positive and s.twin is not None]
        if not pos:
            raise ValueError("accuracy_on needs positives with healthy twins")
        p_pos = self.predict_proba([s.image for s in pos], [s.mask for s in pos])
        p_twin = self.predict_proba([s.twin for s in pos], [s.mask for s in pos])
        sens, spec = float(np.mean(p_pos >= threshold)), float(np.mean(p_twin < threshold))
        per: dict[str, list[float]] = {}
        for s, a, b in zip(pos, p_pos >= threshold, p_twin < threshold):
            per.setdefault(_subject(s.name), []).append((float(a) + float(b)) / 2)
        _, lo, hi = subject_ci(per, n_boot, seed)
        return {"accuracy": (sens + spec) / 2, "accuracy_ci": [lo, hi], "sensitivity": sens, "specificity": spec,
                "n_positive": len(pos)}

    def save(self, directory: str | Path) -> Path:
        if self.model is None:
            raise RuntimeError("LesionDetector is not fitted")
        directory = Path(directory)
        self.model.save(directory, self.NAME, {"kind": self.NAME, "threshold_default": 0.5, **self.info})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LesionDetector:
        model, header = _Linear.load(Path(directory), cls.NAME)
        det = cls(c=header.get("c", 1.0), seed=header.get("seed", 0), require_split=header.get("train_split"))
        det.model, det.info = model, {k: v for k, v in header.items() if k not in ("columns", "feature_version",
                                                                                   "kind", "threshold_default")}
        return det


# -- real vs generated ---------------------------------------------------------------------------------
def clustered_auc(labels: np.ndarray, scores: np.ndarray, clusters: Sequence[str] | None = None, n_boot: int = 1000,
                  seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """ROC AUC of ``scores`` for ``labels`` (1 = positive class) with a percentile-bootstrap CI.

    The bootstrap resamples ``clusters`` (subjects) with replacement, keeping each subject's items together
    (its slices and its real/generated pair are not independent); without clusters every item is its own.
    A resample holding one class only is drawn again. CI (nan, nan) when fewer than two clusters.
    """
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(labels, int), np.asarray(scores, np.float64)
    auc = float(roc_auc_score(y, s))
    keys = np.asarray(clusters if clusters is not None else np.arange(len(y)).astype(str))
    uniq, inv = np.unique(keys, return_inverse=True)
    if len(uniq) < 2 or n_boot <= 0:
        return auc, float("nan"), float("nan")
    members = [np.nonzero(inv == k)[0] for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    boots: list[float] = []
    while len(boots) < n_boot:
        idx = np.concatenate([members[k] for k in rng.integers(len(uniq), size=len(uniq))])
        if y[idx].min() != y[idx].max():
            boots.append(float(roc_auc_score(y[idx], s[idx])))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, (alpha, 1 - alpha))
    return auc, float(lo), float(hi)


class RealismJudge:
    """P(generated) of a region; fitted on pool real vs generated regions, scored by AUC on held-out ones."""

    NAME = "realism_judge"

    def __init__(self, model: _Linear, info: dict | None = None) -> None:
        self.model, self.info = model, info or {}

    def predict_proba(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        """P(generated) of the region of each mask."""
        return self.model.proba(feature_matrix(images, masks, self.model.columns))

    def auc_ci(self, real_imgs: Sequence[np.ndarray], fake_imgs: Sequence[np.ndarray],
               masks_real: Sequence[np.ndarray], masks_fake: Sequence[np.ndarray] | None = None,
               subjects_real: Sequence[str] | None = None, subjects_fake: Sequence[str] | None = None,
               n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """(AUC, lo, hi) of P(generated) separating ``fake_imgs`` (positive class) from ``real_imgs``.

        0.5 = indistinguishable, 1 = every generated region looks more generated than every real one, < 0.5 =
        the real ones look more generated. With subjects, the CI is bootstrapped over subjects.
        """
        masks_fake = masks_real if masks_fake is None else masks_fake
        p_real = self.predict_proba(real_imgs, masks_real)
        p_fake = self.predict_proba(fake_imgs, masks_fake)
        labels = np.r_[np.zeros(len(p_real), int), np.ones(len(p_fake), int)]
        clusters = None
        if subjects_real is not None or subjects_fake is not None:
            if subjects_real is None or subjects_fake is None:
                raise ValueError("give the subjects of both the real and the generated images, or of neither")
            clusters = [*subjects_real, *subjects_fake]
        return clustered_auc(labels, np.r_[p_real, p_fake], clusters, n_boot, seed)

    def auc(self, real_imgs: Sequence[np.ndarray], fake_imgs: Sequence[np.ndarray],
            masks_real: Sequence[np.ndarray], masks_fake: Sequence[np.ndarray] | None = None) -> float:
        """AUC of P(generated): ``fake_imgs`` vs ``real_imgs`` (no CI)."""
        return self.auc_ci(real_imgs, fake_imgs, masks_real, masks_fake, n_boot=0)[0]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save(directory, self.NAME, {"kind": self.NAME, **self.info})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RealismJudge:
        model, header = _Linear.load(Path(directory), cls.NAME)
        return cls(model, {k: v for k, v in header.items() if k not in ("columns", "feature_version", "kind")})


def fit_realism_judge(real_imgs: Sequence[np.ndarray], fake_imgs: Sequence[np.ndarray],
                      masks_real: Sequence[np.ndarray], masks_fake: Sequence[np.ndarray] | None = None,
                      seed: int = 0, c: float = 1.0) -> RealismJudge:
    """Fit the real (0) vs generated (1) classifier on pool regions (every region feature, balanced classes).

    Call it with pool data only: the real healthy twins of the pool positives and a generator's repairs of the
    same positives, each with the lesion mask whose region is judged.
    """
    masks_fake = masks_real if masks_fake is None else masks_fake
    x = np.concatenate([feature_matrix(real_imgs, masks_real), feature_matrix(fake_imgs, masks_fake)])
    y = np.r_[np.zeros(len(real_imgs), int), np.ones(len(fake_imgs), int)]
    return RealismJudge(_Linear.fit(x, y, FEATURES, c, seed),
                        {"n_real": len(real_imgs), "n_fake": len(fake_imgs), "c": c, "seed": seed})


# -- study helpers ----------------------------------------------------------------------------------------

def lesion_columns(detector: LesionDetector, scans: Sequence, outputs: Sequence[np.ndarray],
                   threshold: float = 0.5) -> list[dict[str, float]]:
    """Per repaired scan ``{"lesion_prob", "lesion_free"}`` (region = the scan's lesion mask) for the row."""
    probs = detector.predict_proba(outputs, [s.mask for s in scans])
    return [{"lesion_prob": float(p), "lesion_free": float(p < threshold)} for p in probs]


def realism_row(method: str, paste_back: bool | None, pool_scans: Sequence, pool_outputs: Sequence[np.ndarray],
                scans: Sequence, outputs: Sequence[np.ndarray], seed: int = 0, n_boot: int = 1000) -> dict:
    """Fit the realism judge on the pool (twins vs ``pool_outputs``), score held-out ``outputs`` vs their twins.

    ``pool_scans`` must be ``pretrain`` positives with twins (refused otherwise); ``pool_outputs`` are the
    generator's repairs of them, ``outputs`` its repairs of the held-out ``scans``, in the same order.
    """
    bad = sorted({s.split for s in pool_scans} - {"pretrain"})
    if bad:
        raise ValueError(f"the realism judge trains on the 'pretrain' pool only; got scans of split(s) {bad}")
    if len(pool_outputs) != len(pool_scans) or len(outputs) != len(scans):
        raise ValueError("one output per scan, in order")
    judge = fit_realism_judge([s.twin for s in pool_scans], list(pool_outputs), [s.mask for s in pool_scans],
                              seed=seed)
    masks = [s.mask for s in scans]
    subjects = [_subject(s.name) for s in scans]
    auc, lo, hi = judge.auc_ci([s.twin for s in scans], list(outputs), masks, masks, subjects, subjects,
                               n_boot=n_boot, seed=seed)
    return {"method": method, "paste_back": paste_back, "auc": auc, "auc_ci": [lo, hi],
            "n_pool": len(pool_scans), "n_held_out": len(scans)}


def score_with_judges(detector: LesionDetector, method: str, scans: Sequence,
                      outputs: dict[bool | None, Sequence[np.ndarray]], pool_scans: Sequence | None = None,
                      pool_outputs: dict[bool | None, Sequence[np.ndarray]] | None = None, seed: int = 0,
                      n_boot: int = 1000) -> dict:
    """Both judges on one generator's held-out repairs (as built in ``negdpo.study.generators.score_generator``).

    ``outputs``: {paste_back: repairs of ``scans``}; ``pool_outputs``: the same for the pool positives
    ``pool_scans`` (without them no realism row). Returns ``{"lesion": {paste_back: [per-scan columns]},
    "realism": [realism_row per paste_back]}``.
    """
    lesion = {paste: lesion_columns(detector, scans, outs) for paste, outs in outputs.items()}
    realism = []
    if pool_scans is not None and pool_outputs is not None:
        realism = [realism_row(method, paste, pool_scans, pool_outputs[paste], scans, outs, seed, n_boot)
                   for paste, outs in outputs.items() if paste in pool_outputs]
    return {"lesion": lesion, "realism": realism}


def add_lesion_free(table_rows: list[dict], gen_rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """Fill ``lesion_free_rate`` (+ ``lesion_free_rate_ci``) of the generator table rows in place.

    ``table_rows``: ``negdpo.study.tables.generator_rows`` output ((method, modality, paste_back) rows,
    modality ``all`` pooling both); ``gen_rows``: the per-image rows carrying ``lesion_free``. The rate is the
    mean over subjects of each subject's share, with its subject-bootstrap CI (``negdpo.core.stats``).
    """
    from negdpo.core.stats import subject_ci

    for row in table_rows:
        per: dict[str, list[float]] = {}
        for r in gen_rows:
            if (r["method"], r["paste_back"]) == (row["method"], row["paste_back"]) and "lesion_free" in r \
                    and row["modality"] in ("all", r["modality"]):
                per.setdefault(r["subject_id"], []).append(float(r["lesion_free"]))
        if per:
            mean, lo, hi = subject_ci(per, n_boot, seed)
            row["lesion_free_rate"], row["lesion_free_rate_ci"] = mean, [lo, hi]
    return table_rows


def detector_report(detector: LesionDetector, scans: Sequence, groups: dict[str, str] | None = None) -> dict:
    """The detector's accuracy on real held-out positives vs their twins, overall and per lesion group."""
    out = {"all": detector.accuracy_on(scans)}
    for g in sorted(set((groups or {}).values())):
        sub = [s for s in scans if groups.get(s.name) == g and s.positive]
        if sub:
            out[g] = detector.accuracy_on(sub)
    return out
