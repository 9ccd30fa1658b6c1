"""M2IB (capacity at init, read-out, determinism, batched == single), CLIP Surgery, registry, alignment."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from negdpo.segmentation.saliency import SaliencyContext, available, get, register
from negdpo.segmentation.saliency.common import crop_geometry, grids_to_frames, to_frame, upsample_grid
from negdpo.segmentation.saliency.m2ib import M2IBConfig, capacity

FAST = {"steps": 3, "samples": 2, "beta": 1.0}


def test_capacity_at_init():
    alpha = torch.full((4,), 5.0, dtype=torch.float64)
    lam = torch.sigmoid(alpha[0]).item()
    assert lam == pytest.approx(0.9933071490757153, abs=1e-15)
    assert (1 - lam) ** 2 == pytest.approx(4.479425349469899e-05, rel=1e-9)
    c = capacity(torch.tensor([0.0, 1.0, -2.0, 10.0], dtype=torch.float64), alpha)
    assert c.tolist() == pytest.approx([4.506737745615884, 5.000067291818347, 6.480055930425735,
                                        53.83969236586214], abs=1e-9)


def test_upsampling_and_readout():
    g = torch.zeros(2, 14, 14)
    g[0, 0, 0] = 1.0
    g[1, 5, 9] = 1.0
    up = upsample_grid(g, 224)
    assert (up[0, :8, :8] == 1).all() and up[0, 8, 0].item() == 0.96875 and up[0, 8, 8].item() == 0.9384765625
    assert up[0, 23, 23].item() == 0.0009765625 and up[0, 24, 0].item() == 0
    peak = up[1] == up[1].max()
    assert up[1].max().item() == 0.9384765625 and peak[87:89, 151:153].all() and peak.sum() == 4
    maps = grids_to_frames(torch.stack([g[0], torch.zeros(14, 14)]), [(64, 64), (64, 64)], 224, "crop")
    assert maps[0].max() == pytest.approx(1.0) and maps[0].min() == 0 and not maps[1].any()  # constant -> 0


def test_crop_alignment_non_square():
    geo = crop_geometry(100, 200)  # H x W -> resized 224 x 448, crop columns 112..335
    assert (geo.resized_h, geo.resized_w, geo.top, geo.left) == (224, 448, 0, 112)
    crop_map = np.ones((224, 224), np.float32)
    aligned = to_frame(crop_map, 100, 200, "crop")
    assert aligned.shape == (100, 200) and aligned[:, :45].max() == 0 and aligned[:, 55:145].min() == 1
    assert to_frame(crop_map, 100, 200, "stretch").min() == 1  # the public stretch covers the whole frame
    idx = np.arange(14, dtype=np.float32)[None].repeat(14, 0)
    assert to_frame(idx, 14, 20, "stretch")[0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 9, 10,
                                                            11, 11, 12, 13]


def _scans(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.random((48, 64)).astype(np.float32)
        mask = np.zeros((48, 64), bool)
        mask[10:20, 20 + i:34 + i] = True
        out.append(SimpleNamespace(name=f"img{i}.png", image=img, mask=mask, prompt="a tumour"))
    return out


@pytest.fixture(scope="module")
def ctx(tiny_clip):
    return SaliencyContext(clip=tiny_clip, options=dict(FAST))


def test_m2ib_shape_range_determinism_and_batching(ctx):
    scans = _scans(3)
    prompts = ["a tumour", "a dark mass", "a tumour"]
    batched = get("m2ib")(ctx, scans, prompts)
    assert all(m.shape == (48, 64) and m.dtype == np.float32 for m in batched)
    assert all(m.min() >= 0 and m.max() <= 1 and m.max() > 0.5 for m in batched)
    again = get("m2ib")(ctx, scans, prompts)
    assert all((a == b).all() for a, b in zip(batched, again))
    # one at a time, in reverse order: same maps (each image has its own parameters and noise stream)
    single = [get("m2ib")(ctx, [s], [p])[0] for s, p in reversed(list(zip(scans, prompts)))][::-1]
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a, b, atol=1e-4)
    other_seed = get("m2ib")(SaliencyContext(clip=ctx.clip, seed=99, options=dict(FAST)), scans[:1], prompts[:1])
    assert not np.allclose(other_seed[0], batched[0])


def test_m2ib_layer_checks(tiny_clip):
    from negdpo.segmentation.saliency.m2ib import resolve_layer

    visual = tiny_clip[0].visual
    assert resolve_layer(visual, None) == 3  # 6 blocks -> n - 3
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(visual, 6)
    assert M2IBConfig().steps == 10 and M2IBConfig().lr == 1.0 and M2IBConfig().samples == 10


def test_surgery_and_registry(ctx):
    scans = _scans(2)
    maps = get("surgery")(ctx, scans, ["a tumour", "a tumour"])
    assert all(m.shape == (48, 64) and 0 <= m.min() and m.max() <= 1 for m in maps)
    assert (get("surgery")(ctx, scans, ["a tumour"] * 2)[0] == maps[0]).all()  # training-free, deterministic
    oracle = get("oracle")(SaliencyContext(), scans, ["x", "x"])
    assert oracle[0].max() == 1 and oracle[0][15, 27] == 1 and oracle[0][40, 5] < 0.01
    assert {"m2ib", "surgery", "oracle"} <= set(available())

    @register("constant_test")
    def constant(ctx, scans, prompts):
        return [np.zeros(s.image.shape[:2], np.float32) for s in scans]

    assert get("constant_test") is constant
    with pytest.raises(KeyError, match="unknown saliency method"):
        get("nope")
