"""Generator metrics against hand-computed values."""

import numpy as np
import pytest
from negdpo.generator.evaluate import PSNR_IDENTICAL, inside_error, outside_mi, outside_psnr, repair_metrics


def test_hand_computed_values():
    src = np.zeros((4, 4))
    twin = np.zeros((4, 4))
    out = np.zeros((4, 4))
    lesion = np.zeros((4, 4), bool)
    lesion[1:3, 1:3] = True
    out[1, 1] = 0.4  # one of four lesion pixels off by 0.4
    assert inside_error(out, twin, lesion) == pytest.approx(0.1)
    outside = ~lesion
    assert outside_psnr(out, src, outside) == PSNR_IDENTICAL
    out2 = src.copy()
    out2[0, 0] = 0.1  # mse over 12 outside pixels = 0.01 / 12
    assert outside_psnr(out2, src, outside) == pytest.approx(10 * np.log10(12 / 0.01))
    with pytest.raises(ValueError, match="non-empty"):
        inside_error(out, twin, np.zeros((4, 4), bool))


def test_mi_prefers_the_source_and_row_keys():
    rng = np.random.default_rng(0)
    src = rng.random((32, 32))
    lesion = np.zeros((32, 32), bool)
    lesion[10:20, 10:20] = True
    same = outside_mi(src, src, ~lesion)
    noise = outside_mi(rng.random((32, 32)), src, ~lesion)
    assert same > 5 * noise > 0
    row = repair_metrics(src, src, src, lesion, lesion, residual=lambda o, m: 0.25)
    assert row["inside_err"] == 0 and row["outside_psnr"] == PSNR_IDENTICAL and row["residual_lesion"] == 0.25
    assert row["outside_mi"] == pytest.approx(row["twin_outside_mi"])
