"""Training judges of the on-policy rounds: fitted on training scans only, never on twins (docs/method.md#on-policy-rounds).

* :class:`ResidualLesionJudge` — P(lesion) in the region of a lesion mask, a standardised logistic regression on
  the lesion-contrast region features of :mod:`negdpo.generator.frozen_judges` (the same *code* as the frozen
  evaluation detector, fitted on other data): the lesion regions of the training positives (label 1) against
  regions of healthy tissue of the same training scans (label 0) — lesion-shaped masks placed away from the
  lesions by :func:`negdpo.generator.selfsup.selfsup_masks`. Score = 1 - P(lesion).
* :class:`RealismJudge` — P(generated) of a region, refitted every round on the healthy regions above
  (real, 0) against the round's candidate fills (generated, 1), every region feature: a linear
  discriminator between the policy's fills and real tissue. Score = 1 - P(generated).
* ``mi_out`` / ``fidelity_out`` — anatomy preservation outside the dilated repaint mask
  (:class:`negdpo.preference.pairs.judges.MaskedMIJudge`, :class:`~negdpo.preference.pairs.judges.FidelityJudge`).

:class:`TrainingJudges` returns the weighted mean (weights: ``GenTrainConfig.judge_weights``) and each judge's
score. Scans of another split than ``train``, or carrying a twin, are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .judges import FidelityJudge, JudgeItem, MaskedMIJudge, quantize


@dataclass
class Region:
    """An image with the mask of the region a judge looks at."""

    image: np.ndarray
    mask: np.ndarray


def check_training_scans(scans: Sequence, split: str = "train") -> None:
    """Refuse scans of another split than ``split`` and scans that carry a healthy twin."""
    bad = sorted({s.split for s in scans} - {split})
    if bad:
        raise ValueError(f"training judges fit on the '{split}' split only; got scans of split(s) {bad}")
    twins = [s.name for s in scans if getattr(s, "twin", None) is not None]
    if twins:
        raise ValueError(f"training judges never see healthy twins; {len(twins)} scan(s) carry one "
                         f"(e.g. {twins[0]}): read the folder with ScanFolder(read_twins=False)")


def healthy_regions(scans: Sequence, extra_healthy: Sequence[tuple[str, np.ndarray]], bank: list[np.ndarray],
                    per_scan: int, seed: int, margin: int) -> list[Region]:
    """Lesion-shaped regions of healthy tissue: ``per_scan`` placed masks per training scan (away from its
    lesion) and per extra healthy image (e.g. ``negatives/``)."""
    from negdpo.generator.selfsup import selfsup_masks

    out = []
    items = [(s.name, s.image, s.mask if s.positive else None) for s in scans]
    items += [(name, img, None) for name, img in extra_healthy]
    for name, image, lesion in items:
        for m in selfsup_masks(f"judge/{name}", image, lesion, bank, per_scan, seed, margin):
            out.append(Region(image, m))
    return out


class ResidualLesionJudge:
    """P(lesion) in a lesion-mask region; fitted on training positives vs healthy training regions."""

    name = "lesion"

    def __init__(self, model=None, info: dict | None = None) -> None:
        self.model, self.info = model, info or {}

    @classmethod
    def fit(cls, positives: Sequence, healthy: Sequence[Region], c: float = 1.0, seed: int = 0,
            split: str = "train") -> ResidualLesionJudge:
        from negdpo.generator.frozen_judges import LESION_FEATURES, LinearJudge, feature_matrix

        check_training_scans(positives, split)
        pos = [s for s in positives if s.positive]
        if not pos or not healthy:
            raise ValueError(f"the lesion judge needs training positives and healthy regions "
                             f"(got {len(pos)} and {len(healthy)})")
        x = feature_matrix([s.image for s in pos] + [r.image for r in healthy],
                           [s.mask for s in pos] + [r.mask for r in healthy], LESION_FEATURES)
        y = np.r_[np.ones(len(pos), int), np.zeros(len(healthy), int)]
        return cls(LinearJudge.fit(x, y, LESION_FEATURES, c, seed),
                   {"n_positive": len(pos), "n_healthy_regions": len(healthy), "c": c, "seed": seed})

    def lesion_prob(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        from negdpo.generator.frozen_judges import feature_matrix

        return self.model.proba(feature_matrix(images, masks, self.model.columns))

    def save(self, directory: str | Path) -> None:
        self.model.save(Path(directory), self.name, {"kind": "training_lesion_judge", **self.info})

    @classmethod
    def load(cls, directory: str | Path) -> ResidualLesionJudge:
        from negdpo.generator.frozen_judges import LinearJudge

        model, header = LinearJudge.load(Path(directory), cls.name)
        return cls(model, header)


class RealismJudge:
    """P(generated) of a region: healthy training regions (0) vs the round's candidate fills (1)."""

    name = "realism"

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def fit(cls, real: Sequence[Region], fake: Sequence[Region], c: float = 1.0, seed: int = 0) -> RealismJudge:
        from negdpo.generator.frozen_judges import FEATURES, LinearJudge, feature_matrix

        x = feature_matrix([r.image for r in real] + [r.image for r in fake], [r.mask for r in real] +
                           [r.mask for r in fake], FEATURES)
        y = np.r_[np.zeros(len(real), int), np.ones(len(fake), int)]
        return cls(LinearJudge.fit(x, y, FEATURES, c, seed))

    def generated_prob(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        from negdpo.generator.frozen_judges import feature_matrix

        return self.model.proba(feature_matrix(images, masks, self.model.columns))


class TrainingJudges:
    """Weighted mean of the training judges for the candidates of one positive (higher = better fill)."""

    def __init__(self, weights: dict[str, float], lesion: ResidualLesionJudge | None,
                 realism: RealismJudge | None) -> None:
        missing = [n for n, j in (("lesion", lesion), ("realism", realism)) if weights.get(n, 0) > 0 and j is None]
        if missing:
            raise ValueError(f"judge(s) {missing} have a weight but were not fitted")
        self.weights = {k: w for k, w in weights.items() if w > 0}
        self.lesion, self.realism = lesion, realism
        self.spec = ",".join(f"{k}={w:g}" for k, w in self.weights.items())

    def __call__(self, source: np.ndarray, lesion_mask: np.ndarray, repaint_mask: np.ndarray,
                 candidates: list[np.ndarray]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """(scores, per-candidate {judge: score}); candidates are judged as stored (8-bit)."""
        images = [quantize(c) for c in candidates]
        parts: dict[str, np.ndarray] = {}
        if "lesion" in self.weights:
            parts["lesion"] = 1.0 - self.lesion.lesion_prob(images, [lesion_mask] * len(images))
        if "realism" in self.weights:
            parts["realism"] = 1.0 - self.realism.generated_prob(images, [lesion_mask] * len(images))
        item = JudgeItem(source=quantize(source), mask=repaint_mask, prompt="", healthy_text="")
        for judge in (MaskedMIJudge(), FidelityJudge()):
            if judge.name in self.weights:
                parts[judge.name] = np.asarray(judge(item, images), np.float64)
        total = sum(self.weights[k] * v for k, v in parts.items()) / sum(self.weights.values())
        per = [{k: round(float(v[i]), 6) for k, v in parts.items()} for i in range(len(images))]
        return np.asarray(total, np.float64), per
