"""Saliency levers: anatomy foreground in post-processing, M2IB's contrastive target, the tiny-wide CLIP."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from negdpo.segmentation.postprocess import coarse_mask, foreground_mask, kmeans_mask


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_foreground_mask_is_the_anatomy_with_its_dark_lesion():
    """A disk of tissue (0.5) on black with a near-black lesion 1-2 px from the disk's border (the smoothed rim
    breaks, so a plain hole fill would miss it): the mask is the disk, the lesion included (convex hull),
    the black corners are not in it."""
    h = w = 96
    body = _disk(h, w, 48, 48, 36)
    lesion = _disk(h, w, 48, 74, 8.5)
    img = np.where(body, 0.5, 0.0)
    img[lesion] = 0.03
    fg = foreground_mask(img)
    iou = (fg & body).sum() / (fg | body).sum()
    assert iou > 0.9
    assert not (fg & ~_disk(h, w, 48, 48, 36 + 3)).any()  # smoothing widens the edge by at most ~sigma px
    assert body[4:-4, 4:-4].sum() and fg[body].mean() > 0.99
    assert fg[lesion].mean() > 0.95
    assert not fg[:8, :8].any() and not fg[-8:, -8:].any()
    assert foreground_mask(np.full((10, 12), 0.4)).all()  # constant image: nothing to separate


def test_region_keeps_kmeans_off_a_bright_rim_outside_the_anatomy():
    """Saliency: a bright rim outside the anatomy (0.9), a blob inside (0.7), rest 0.1. Without a region the rim
    is the k-means foreground and the largest component; restricted to the anatomy the result is the blob."""
    h = w = 64
    body = _disk(h, w, 32, 32, 24)
    blob = _disk(h, w, 30, 36, 6)
    sal = np.full((h, w), 0.1)
    sal[~_disk(h, w, 32, 32, 27)] = 0.9
    sal[blob] = 0.7
    plain = coarse_mask(sal, "kmeans", k=1)
    assert not (plain & blob).any()  # the rim wins without the region
    got = coarse_mask(sal, "kmeans", k=1, region=body)
    np.testing.assert_array_equal(got, blob)
    assert not (kmeans_mask(sal, region=body) & ~body).any()
    assert not coarse_mask(sal, "otsu", region=body)[~body].any()
    assert not kmeans_mask(sal, region=np.zeros((h, w), bool)).any()
    with pytest.raises(ValueError, match="parity"):
        kmeans_mask(sal, parity=True, region=body)


def test_contrast_target_is_prompt_minus_healthy_report(tiny_clip):
    """target="contrast": unit prompt embedding - unit embedding of the modality's healthy report (computed
    here straight from encode_text); "prompt" is the prompt embedding itself; unknown modality is refused."""
    from negdpo.core.prompts import HEALTHY_TEXT
    from negdpo.segmentation.saliency.m2ib import target_features

    model, _, tok = tiny_clip
    prompts = ["a bright tumour in the left frontal lobe", "a hypoechoic mass"]
    names = ["mri_0001_0.png", "us_0002_1.png"]
    with torch.no_grad():
        t = model.encode_text(tok(prompts)).float()
        hl = model.encode_text(tok([HEALTHY_TEXT["mri"], HEALTHY_TEXT["us"]])).float()
    want = F.normalize(t, dim=-1) - F.normalize(hl, dim=-1)
    got = target_features(model, tok, prompts, names, "contrast", "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target_features(model, tok, prompts, names, "prompt", "cpu").float(), t)
    with pytest.raises(ValueError, match="modality"):
        target_features(model, tok, prompts, ["ct_1.png", "us_1.png"], "contrast", "cpu")
    with pytest.raises(ValueError, match="target"):
        target_features(model, tok, prompts, names, "other", "cpu")


def test_evaluate_runs_the_levers_and_respects_the_foreground(phantom_dir, tmp_path):
    """The EvalConfig keys reach the chain: with post_foreground every coarse mask lies inside the scan's anatomy
    (checked pixelwise on the saved coarse PNG), and the contrastive target runs through evaluate."""
    from negdpo.core.scans import ScanFolder
    from negdpo.segmentation.evaluate import evaluate
    from PIL import Image

    scans = [s for s in ScanFolder(phantom_dir).load_split("test") if s.positive][:2]
    res = evaluate(None, {"t": "tiny"}, tmp_path / "ev", scans=scans, sam="none", bootstrap=10,
                   m2ib_steps=2, m2ib_samples=2, m2ib_beta=1.0, control_prompt=None, post_foreground=True,
                   m2ib_target="contrast")
    assert [r["image"] for r in res.rows] == [s.name for s in scans]
    assert res.summary["config"]["post_foreground"] and res.summary["config"]["m2ib_target"] == "contrast"
    for row, s in zip(res.rows, scans):
        coarse = np.asarray(Image.open(tmp_path / "ev" / "coarse" / (s.name.rsplit(".", 1)[0] + ".png"))) > 0
        assert coarse.sum() == row["coarse_area"] > 0
        assert not (coarse & ~foreground_mask(s.image)).any()


def test_tiny_wide_preset_shape_and_saliency_grid():
    """tiny-wide: vision width 128 / 4 heads / 6 blocks on a 14 x 14 grid, joint embedding 64, BERT 128 wide;
    M2IB reads a 14 x 14 capacity grid out of it."""
    from negdpo.core.models import load_clip
    from negdpo.segmentation.saliency.m2ib import M2IBConfig, m2ib_grids

    model, preprocess, tok = load_clip("tiny-wide")
    trunk = model.visual.trunk
    assert trunk.embed_dim == 128 and len(trunk.blocks) == 6 and trunk.blocks[0].attn.num_heads == 4
    assert trunk.pos_embed.shape[1] == 14 * 14 + 1
    assert model.text.transformer.config.hidden_size == 128
    with torch.no_grad():
        emb = model.encode_text(tok(["a scan"]))
    assert emb.shape == (1, 64)
    grids = m2ib_grids(model, torch.randn(1, 3, 224, 224), emb, [0], M2IBConfig(steps=1, samples=1, beta=1.0))
    assert grids.shape == (1, 14, 14) and torch.isfinite(grids).all()


def test_lambda_readout_is_the_kept_share_of_the_last_forward(tiny_clip):
    """readout="lambda": sigmoid(alpha) of the last forward, channel mean. After one step that forward used the
    initial alpha, so the map is sigmoid(init) everywhere; after more steps it moves and stays in (0, 1)."""
    import math

    from negdpo.segmentation.saliency.m2ib import M2IBConfig, m2ib_grids

    model, _, tok = tiny_clip
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tf = model.encode_text(tok(["a tumour", "a mass"]))
    one = m2ib_grids(model, images, tf, [1, 2], M2IBConfig(steps=1, samples=1, beta=1.0, init=2.0, readout="lambda"))
    torch.testing.assert_close(one, torch.full((2, 14, 14), 1 / (1 + math.exp(-2.0))))
    more = m2ib_grids(model, images, tf, [1, 2], M2IBConfig(steps=3, samples=1, beta=1.0, init=2.0, readout="lambda"))
    assert more.std() > 0 and ((more > 0) & (more < 1)).all()
    with pytest.raises(ValueError, match="readout"):
        m2ib_grids(model, images, tf, [1, 2], M2IBConfig(steps=1, samples=1, readout="other"))


def test_evaluate_cli_exposes_the_levers():
    """The three lever keys reach EvalConfig from `negdpo evaluate` flags; the defaults stay MedCLIP-SAMv2's."""
    from negdpo.segmentation.cli import _options, build_parser

    on = _options(build_parser().parse_args(["--data", "d", "--out", "o", "--m2ib_target", "contrast",
                                             "--m2ib_readout", "lambda", "--post_foreground"]))
    assert (on["m2ib_target"], on["m2ib_readout"], on["post_foreground"]) == ("contrast", "lambda", True)
    off = _options(build_parser().parse_args(["--data", "d", "--out", "o"]))
    assert (off["m2ib_target"], off["m2ib_readout"], off["post_foreground"]) == ("prompt", "capacity", False)
