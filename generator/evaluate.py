"""How well a generator removed a lesion, scored against the healthy twin: docs/method.md#generator-metrics.

Every metric compares float images in [0, 1] of one scan:

* ``inside_err``: mean |output - twin| inside the lesion mask (0 = the twin exactly);
* ``outside_psnr``: PSNR of the output against the source outside the repaint mask (99 dB = identical);
* ``outside_mi``: weighted Parzen mutual information (nats) between output and source outside the repaint mask,
  with the same estimator as the training regulariser (:func:`negdpo.generator.mi.weighted_mi`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PSNR_IDENTICAL = 99.0


def inside_error(output: np.ndarray, twin: np.ndarray, lesion: np.ndarray) -> float:
    lesion = np.asarray(lesion, bool)
    if not lesion.any():
        raise ValueError("inside_error needs a non-empty lesion mask")
    return float(np.abs(np.asarray(output, np.float64) - np.asarray(twin, np.float64))[lesion].mean())


def outside_psnr(output: np.ndarray, source: np.ndarray, outside: np.ndarray) -> float:
    """PSNR (peak 1) over ``outside`` pixels; ``PSNR_IDENTICAL`` when they are equal."""
    outside = np.asarray(outside, bool)
    diff = np.asarray(output, np.float64)[outside] - np.asarray(source, np.float64)[outside]
    mse = float(np.mean(diff ** 2)) if diff.size else 0.0
    return PSNR_IDENTICAL if mse == 0 else float(10 * np.log10(1.0 / mse))


def outside_mi(output: np.ndarray, source: np.ndarray, outside: np.ndarray) -> float:
    """Weighted Parzen MI (nats) between output and source over the ``outside`` pixels."""
    import torch

    from .mi import weighted_mi

    a = torch.from_numpy(np.asarray(output, np.float32))[None, None]
    b = torch.from_numpy(np.asarray(source, np.float32))[None, None]
    w = torch.from_numpy(np.asarray(outside, np.float32))[None, None]
    return float(weighted_mi(a, b, w)[0])


def repair_metrics(output: np.ndarray, source: np.ndarray, twin: np.ndarray, lesion: np.ndarray,
                   repaint: np.ndarray, residual: Callable[[np.ndarray, np.ndarray], float] | None = None
                   ) -> dict[str, float]:
    """All metrics of one repaired scan (gray float images); ``residual(output, repaint)`` adds a lesion score."""
    outside = ~np.asarray(repaint, bool)
    row = {"inside_err": inside_error(output, twin, lesion),
           "outside_psnr": outside_psnr(output, source, outside),
           "outside_mi": outside_mi(output, source, outside),
           "twin_outside_mi": outside_mi(twin, source, outside)}
    if residual is not None:
        row["residual_lesion"] = float(residual(output, repaint))
    return row
