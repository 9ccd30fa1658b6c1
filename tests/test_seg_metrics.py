"""Metrics against hand-computed cases and independent parity slab NSD numbers (docs/method.md#metrics)."""

import math

import numpy as np
import pytest
import torch
from negdpo.segmentation import metrics as M


def square(r0: int, r1: int, size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[r0:r1 + 1, r0:r1 + 1] = True
    return m


GT = square(20, 39)


@pytest.mark.parametrize("shift,dsc,nsd_parity,nsd_2d", [
    (1, 0.95, 1.0, 1.0), (2, 0.9, 1.0, 1.0), (3, 0.85, 0.966632, 0.550743), (4, 0.8, 0.917513, None),
    (5, 0.75, 0.868394, 0.5), (8, 0.6, 0.721036, 0.423885)])
def test_shifted_squares(shift, dsc, nsd_parity, nsd_2d):
    pred = np.roll(GT, shift, axis=0)
    assert M.dice(pred, GT) == pytest.approx(dsc, abs=1e-12)
    assert M.iou(pred, GT) == pytest.approx((20 - shift) / (20 + shift), abs=1e-12)
    assert M.nsd(pred, GT, mode="parity") == pytest.approx(nsd_parity, abs=2e-6)
    if nsd_2d is not None:
        assert M.nsd(pred, GT) == pytest.approx(nsd_2d, abs=2e-6)
    assert M.hd95(pred, GT) == pytest.approx(float(shift))  # top/bottom edges are > 5 % of the boundary


@pytest.mark.parametrize("tol,val", [(1, 0.917513), (2, 0.966632), (3, 1.0)])
def test_parity_tolerance(tol, val):
    assert M.nsd(np.roll(GT, 3, axis=0), GT, tolerance=tol, mode="parity") == pytest.approx(val, abs=2e-6)


@pytest.mark.parametrize("r0,r1,dsc,nsd", [(22, 37, 0.780488, 0.990462), (23, 36, 0.657718, 0.892958),
                                            (17, 42, 0.743494, 0.924853), (18, 41, 0.819672, 0.993545),
                                            (26, 33, 0.275862, 0.467089)])
def test_concentric_squares(r0, r1, dsc, nsd):
    pred = square(r0, r1)
    assert M.dice(pred, GT) == pytest.approx(dsc, abs=1e-6)
    assert M.nsd(pred, GT, mode="parity") == pytest.approx(nsd, abs=2e-6)


def test_extra_blob_and_single_pixels():
    pred = GT.copy()
    pred[50:55, 50:55] = True
    assert M.dice(pred, GT) == pytest.approx(0.969697, abs=1e-6)
    assert M.nsd(pred, GT, mode="parity") == pytest.approx(0.96721, abs=2e-6)
    a, b, c = (np.zeros((64, 64), bool) for _ in range(3))
    a[30, 30], b[30, 32], c[30, 33] = True, True, True
    assert M.dice(a, b) == 0.0 and M.iou(a, b) == 0.0
    for mode in ("parity", "boundary"):
        assert M.nsd(a, b, mode=mode) == pytest.approx(1.0)
        assert M.nsd(a, c, mode=mode) == pytest.approx(0.5)
    assert M.hd95(a, c) == pytest.approx(3.0)


def test_empty_conventions():
    empty = np.zeros((64, 64), bool)
    assert (M.dice(empty, empty), M.iou(empty, empty), M.nsd(empty, empty), M.hd95(empty, empty)) == (1, 1, 1, 0)
    assert math.isnan(M.dice(empty, empty, empty=math.nan))
    for p, g in ((empty, GT), (GT, empty)):
        assert M.dice(p, g) == 0 and M.iou(p, g) == 0 and M.nsd(p, g) == 0 and M.nsd(p, g, mode="parity") == 0
        assert math.isnan(M.hd95(p, g))
    assert M.parity_round(0.966632) == 0.9666


def test_input_checks_and_nonbool():
    with pytest.raises(ValueError, match=r"^mask shapes differ: pred \(64, 64\) vs gt \(10, 64\)$"):
        M.dice(GT, GT[:10])
    with pytest.raises(ValueError, match=r"^masks must be 2-D, got pred \(1, 64, 64\) and gt \(1, 64, 64\)$"):
        M.dice(GT[None], GT[None])
    for p, g in ((GT, GT[None]), (GT[None], GT)):  # either one not 2-D
        with pytest.raises(ValueError, match="^masks must be 2-D"):
            M.iou(p, g)
    assert M.dice(GT.astype(np.uint8), GT * 255) == 1.0  # any non-zero = foreground (0/1 and 0/255 alike)


def test_agrees_with_monai_dice_iou():
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    for _ in range(3):
        p, g = rng.random((32, 32)) > 0.6, rng.random((32, 32)) > 0.5
        pt, gt = torch.from_numpy(p)[None, None].float(), torch.from_numpy(g)[None, None].float()
        assert M.dice(p, g) == pytest.approx(compute_dice(pt, gt).item(), abs=1e-6)
        assert M.iou(p, g) == pytest.approx(compute_iou(pt, gt).item(), abs=1e-6)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    """4 isolated far pixels among 80 boundary pixels: the 95th percentile (linear) is 0.05 x 11, the max 11."""
    pred = GT.copy()
    pred[50, [24, 28, 32, 36]] = True  # each 11 px below the square's bottom edge (row 39)
    assert M.hd95(pred, GT) == pytest.approx(0.05 * 11, abs=1e-4)  # float32 distances
    assert M.hd95(GT, pred) == pytest.approx(0.05 * 11, abs=1e-4)


def test_all_metrics_columns_and_mode_check():
    pred = np.roll(GT, 3, axis=0)
    row = M.all_metrics(pred, GT)
    assert row == pytest.approx({"dice": 0.85, "iou": 17 / 23, "nsd": 0.550743, "nsd_parity": 0.966632,
                                 "hd95": 3.0}, abs=2e-6)
    assert M.all_metrics(pred, GT, tolerance=3)["nsd_parity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"^unknown NSD mode 'slab' \(use 'boundary' or 'parity'\)$"):
        M.nsd(pred, GT, mode="slab")
    assert math.isnan(M.parity_round(math.nan)) and M.parity_round(0.12345) == 0.1235
    empty = np.zeros((64, 64), bool)
    assert math.isnan(M.iou(empty, empty, empty=math.nan)) and math.isnan(M.nsd(empty, empty, empty=math.nan))
    assert M.nsd(empty, empty, mode="parity") == 1.0
