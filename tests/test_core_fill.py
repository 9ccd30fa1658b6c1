"""The one classical fill: harmonic interpolation reproduces what it should and touches nothing else."""

import numpy as np
from negdpo.core.fill import classical_fill, harmonic_fill


def test_linear_ramp_is_reproduced_gray_and_colour():
    y, x = np.mgrid[0:24, 0:24] / 23.0
    ramp = 0.2 + 0.5 * x + 0.1 * y  # harmonic: the Laplace fill is exact
    mask = np.zeros((24, 24), bool)
    mask[8:15, 6:17] = True
    holed = np.where(mask, 0.0, ramp)
    assert np.abs(harmonic_fill(holed, mask) - ramp).max() < 1e-9
    rgb = np.stack([holed, 1 - holed, holed / 2], -1)
    out = classical_fill(rgb, mask, dilate=0)
    want = np.stack([ramp, 1 - ramp, ramp / 2], -1)
    assert out.dtype == np.float32 and np.abs(out - want).max() < 1e-6


def test_outside_the_dilated_mask_is_untouched():
    rng = np.random.default_rng(0)
    img = rng.random((20, 20))
    mask = np.zeros((20, 20), bool)
    mask[9:11, 9:11] = True
    out = classical_fill(img, mask, dilate=2)
    far = np.ones((20, 20), bool)
    far[7:13, 7:13] = False
    np.testing.assert_array_equal(out[far], img[far].astype(np.float32))
    assert not np.allclose(out[9:11, 9:11], img[9:11, 9:11])
