"""k-means / threshold / component filter / boxes / points (docs/method.md#post-processing), SAM prompting."""

import numpy as np
import pytest
from negdpo.segmentation import postprocess as P


def test_kmeans_columns():
    sal = np.zeros((8, 8))
    sal[:, :4], sal[:, 4:6], sal[:, 6:] = 20, 140, 230
    expected = np.zeros((8, 8), bool)
    expected[:, 4:] = True
    for parity in (False, True):
        assert (P.kmeans_mask(sal / 255, parity=parity) == expected).all()
    assert not P.kmeans_mask(np.full((8, 8), 0.3)).any()  # constant map -> empty
    assert (P.otsu_mask(sal / 255) == expected).all()
    assert (P.threshold_mask(sal / 255, 140 / 255) == (sal > 140)).all()  # strict


def test_component_filter_ties_and_connectivity():
    m = np.zeros((10, 10), bool)
    m[0:3, 0:3] = m[6:9, 6:9] = True
    assert P.keep_largest(m, 1, ties="parity").sum() == 18  # the public rule keeps both equal blobs
    exact = P.keep_largest(m, 1, ties="exact")
    assert exact.sum() == 9 and exact[0, 0]  # exactly K, first in raster order wins
    m[5, 5] = True  # touches the second blob diagonally -> part of it (8-connectivity)
    assert P.keep_largest(m, 1).sum() == 10 and P.keep_largest(m, 1)[5, 5]
    d = np.zeros((5, 5), bool)
    d[1, 1] = d[2, 2] = True
    assert len(P.components(d)[1]) == 1 and P.num_contours(d) == 1
    assert P.keep_largest(m, 0).sum() == m.sum()


def test_boxes_union_and_per_component():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    m[7:9, 9:11] = True
    assert P.boxes_from_mask(m).tolist() == [[3, 2, 11, 9]]
    assert P.boxes_from_mask(m, "per_component").tolist() == [[3, 2, 7, 5], [9, 7, 11, 9]]
    assert P.num_contours(m) == 2
    assert P.boxes_from_mask(np.zeros((10, 12), bool)).shape == (0, 4)
    assert (P.keep_largest(m | np.pad(np.ones((1, 1), bool), ((0, 9), (0, 11))), P.num_contours(m)) == m).all()


def test_points_seeded_and_bounded():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    a = P.sample_points(m, 5, np.random.default_rng(3), n_negative=2)
    b = P.sample_points(m, 5, np.random.default_rng(3), n_negative=2)
    assert (a[0] == b[0]).all() and a[1].tolist() == [1] * 5 + [0] * 2
    assert all(m[int(y), int(x)] for x, y in a[0][:5]) and not any(m[int(y), int(x)] for x, y in a[0][5:])
    pts, lbl = P.sample_points(m, 100, np.random.default_rng(0))  # fewer candidates than asked: all of them
    assert len(pts) == 12 and len({tuple(p) for p in pts.tolist()}) == 12


@pytest.fixture(scope="module")
def tiny_sam():
    from negdpo.core.models import load_sam

    return load_sam("tiny")


@pytest.mark.parametrize("prompt,box_mode,multimask", [("box", "union", False), ("point", "union", False),
                                                       ("both", "per_component", True)])
def test_sam_prompting_and_empty_coarse(tiny_sam, prompt, box_mode, multimask):
    from negdpo.segmentation.sam_prompt import SamConfig, SamSegmenter

    seg = SamSegmenter(tiny_sam, SamConfig(prompt=prompt, box_mode=box_mode, multimask=multimask))
    img = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    seg.set_image(img)
    coarse = np.zeros((48, 40), bool)
    coarse[5:15, 5:15] = coarse[30:40, 20:35] = True
    mask, info = seg.segment(coarse, seed=1)
    assert mask.shape == (48, 40) and mask.dtype == bool and not info["empty_coarse"]
    assert info["n_prompts"] == (2 if box_mode == "per_component" else 1)
    assert P.num_contours(mask) <= 2  # final filter: K = number of coarse contours
    again, _ = seg.segment(coarse, seed=1)
    assert (again == mask).all()
    empty, info = seg.segment(np.zeros((48, 40), bool))
    assert not empty.any() and info == {"empty_coarse": True, "n_prompts": 0}
