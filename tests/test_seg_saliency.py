"""M2IB (capacity at init, read-out, determinism, batched == single), CLIP Surgery, registry, alignment."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from negdpo.segmentation.saliency import SaliencyContext, available, get, register
from negdpo.segmentation.saliency.common import crop_geometry, grids_to_frames, to_frame, upsample_grid
from negdpo.segmentation.saliency.m2ib import M2IBConfig, capacity, image_seeds, m2ib_grids

FAST = {"steps": 3, "samples": 2, "beta": 1.0}
FAST_AUTO_BETA = {"steps": 3, "samples": 2}


def test_capacity_is_the_gaussian_kl_to_the_prior():
    """Elementwise KL(N(lam x, (1-lam)^2) || N(0,1)) = (s2 + m^2 - 1 - ln s2) / 2, written out with math."""
    xs = [0.0, 1.0, -2.0, 10.0, 0.3]
    alphas = [5.0, 0.0, -3.0, 2.5, 30.0]
    got = capacity(torch.tensor(xs, dtype=torch.float64), torch.tensor(alphas, dtype=torch.float64))
    for x, a, c in zip(xs, alphas, got.tolist()):
        lam = 1 / (1 + math.exp(-a))
        s2 = (1 - lam) ** 2 if a < 20 else math.exp(-2 * a)  # (1 - lam)^2 without cancellation
        assert c == pytest.approx(0.5 * (s2 + (lam * x) ** 2 - 1 - math.log(s2)), rel=1e-9)
    assert got.min() >= 0
    # lam -> 0 (z = pure noise = the prior): no information passes
    assert capacity(torch.tensor([3.0]), torch.tensor([-40.0])).item() == pytest.approx(0.0, abs=1e-12)


def test_beta_default_per_modality():
    """Defect: the function (1.0), the CLI and the brain preset disagreed; one documented default per modality."""
    from negdpo.segmentation.cli import build_parser
    from negdpo.segmentation.evaluate import EvalConfig
    from negdpo.segmentation.saliency.m2ib import BETA_BY_MODALITY, DEFAULT_BETA, modality_beta

    assert M2IBConfig().beta is None and EvalConfig().m2ib_beta is None
    assert build_parser().parse_args(["--data", "d", "--out", "o"]).m2ib_beta is None
    assert modality_beta("mri_0003_1.png") == 2.0 == BETA_BY_MODALITY["brain"]
    assert modality_beta("us_0001_0.png") == 1.0 == BETA_BY_MODALITY["breast"]
    assert modality_beta("ct_0001_0.png") == DEFAULT_BETA == modality_beta("scan.png") == 1.0
    assert modality_beta("MRI_7.png") == 2.0


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
    assert resolve_layer(visual, 0) == 0 and resolve_layer(visual, 5) == 5
    for bad in (6, -1):
        with pytest.raises(ValueError, match=rf"^M2IB layer {bad} out of range for a vision tower with 6 blocks \(0\.\.5\)$"):
            resolve_layer(visual, bad)
    two = SimpleNamespace(trunk=SimpleNamespace(blocks=[None, None], patch_embed=None))
    assert resolve_layer(two, None) == 0  # fewer than 3 blocks: the first block
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
    for name in ("m2ib", "surgery"):
        with pytest.raises(ValueError, match=f"^{name} needs a CLIP model$"):
            get(name)(SaliencyContext(), scans, ["x", "x"])
    with pytest.raises(KeyError, match="unknown saliency method"):
        get("nope")


def _with_dropout(model):
    """A copy whose blocks drop half their residual branch in train mode (identical to ``model`` in eval)."""
    m = copy.deepcopy(model)
    for blk in m.visual.trunk.blocks:
        blk.ls1 = torch.nn.Dropout(0.5)
    return m.train()


def test_saliency_runs_the_model_in_eval_mode(ctx, tiny_clip):
    """Defect: a model handed over in train mode gave random maps; the method now sets eval() itself."""
    scans = _scans(1)
    ref = get("m2ib")(ctx, scans, ["a tumour"])[0]
    noisy = _with_dropout(tiny_clip[0])
    train_ctx = SaliencyContext(clip=(noisy, *tiny_clip[1:]), options=dict(FAST))
    for name, expect in (("m2ib", ref), ("surgery", get("surgery")(ctx, scans, ["a tumour"])[0])):
        got = get(name)(train_ctx, scans, ["a tumour"])[0]
        np.testing.assert_allclose(got, expect, atol=1e-5, err_msg=name)
        assert noisy.training and noisy.visual.trunk.blocks[0].training  # the caller's mode is restored


def test_m2ib_beta_per_image_and_per_modality(ctx, tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    scans = _scans(2)
    scans[0].name, scans[1].name = "mri_0001_0.png", "us_0002_0.png"
    auto = get("m2ib")(SaliencyContext(clip=tiny_clip, options=dict(FAST_AUTO_BETA)), scans, ["a tumour"] * 2)
    for scan, beta, got in zip(scans, (2.0, 1.0), auto):
        explicit = get("m2ib")(SaliencyContext(clip=tiny_clip, options={**FAST_AUTO_BETA, "beta": beta}),
                               [scan], ["a tumour"])[0]
        np.testing.assert_allclose(got, explicit, atol=1e-4)
    one = get("m2ib")(SaliencyContext(clip=tiny_clip, options={**FAST_AUTO_BETA, "beta": 1.0}), scans[:1], ["a tumour"])
    assert not np.allclose(one[0], auto[0], atol=1e-3)  # beta 1 vs the brain MRI default 2 differ
    # other methods' options are ignored; an RGB scan gives a map at its (H, W)
    rgb = SimpleNamespace(name="us_0009_0.png", image=np.repeat(scans[1].image[..., None], 3, axis=2), mask=None)
    opts = {**FAST_AUTO_BETA, "surgery_start": 2, "oracle_sigma": 0.5}
    (m,) = get("m2ib")(SaliencyContext(clip=tiny_clip, options=opts), [rgb], ["a tumour"])
    assert m.shape == (48, 64)


def _m2ib_reference(model, image, text_feat, seed, beta, steps, samples, lr=1.0, init=5.0):
    """One image, written plainly: Adam on alpha for ``steps`` updates of beta*mean C - mean cos."""
    from negdpo.segmentation.saliency.common import embed_from, tokens_through

    visual = model.visual
    layer = len(visual.trunk.blocks) - 3
    with torch.no_grad():
        x = tokens_through(visual, image[None], layer)[0]
    alpha = torch.full_like(x, init, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    cap = None
    for _ in range(steps):
        opt.zero_grad()
        eps = torch.randn((samples, *x.shape), generator=gen)
        lam = torch.sigmoid(alpha)
        z = lam * x + (1 - lam) * eps
        feats = embed_from(visual, z, layer + 1)
        cos = torch.nn.functional.cosine_similarity(feats, text_feat[None], dim=-1, eps=1e-6)
        cap = capacity(x, alpha)
        (beta * cap.mean() - cos.mean()).backward()
        opt.step()
    return cap.detach()[1:].sum(-1)


def test_m2ib_grids_match_a_plain_reference(tiny_clip):
    from negdpo.segmentation.saliency.common import preprocess_batch, text_features, tokens_through

    model, preprocess, tokenizer = tiny_clip
    scans = _scans(2)
    images = preprocess_batch([s.image for s in scans], preprocess, "cpu")
    tf = text_features(model, tokenizer, ["a tumour", "a dark mass"], "cpu")
    seeds = image_seeds([s.name for s in scans], 12)
    # small betas: with beta ~1 the capacity term alone sets the sign of every first Adam step, and the map
    # would not depend on the text/image path at all (a wrong block index would go unnoticed)
    betas = (1e-3, 1e-2)
    grids = m2ib_grids(model, images, tf, seeds, M2IBConfig(steps=3, samples=2), betas=list(betas))
    for i, beta in enumerate(betas):
        ref = _m2ib_reference(model, images[i], tf[i], seeds[i], beta, steps=3, samples=2)
        torch.testing.assert_close(grids[i].flatten(), ref, atol=1e-4, rtol=1e-4)
    zero = m2ib_grids(model, images[:1], tf[:1], seeds[:1], M2IBConfig(steps=0))
    x = tokens_through(model.visual, images[:1], 3)
    torch.testing.assert_close(zero.flatten(), capacity(x, torch.full_like(x, 5.0))[0, 1:].sum(-1))
    with pytest.raises(ValueError, match="^need one beta per image$"):
        m2ib_grids(model, images, tf, seeds, M2IBConfig(steps=1), betas=[1.0])
    with pytest.raises(ValueError, match="^need one text feature and one seed per image$"):
        m2ib_grids(model, images, tf, seeds[:1], M2IBConfig(steps=1))


def test_m2ib_leaves_the_model_untouched(tiny_clip):
    """No gradient reaches the model's weights and their requires_grad flags come back as they were."""
    from negdpo.segmentation.saliency.common import preprocess_batch, text_features

    model = copy.deepcopy(tiny_clip[0])
    frozen = model.visual.trunk.blocks[0].attn.qkv.weight
    frozen.requires_grad_(False)
    images = preprocess_batch([s.image for s in _scans(1)], tiny_clip[1], "cpu")
    tf = text_features(model, tiny_clip[2], ["a tumour"], "cpu")
    m2ib_grids(model, images, tf, [1], M2IBConfig(steps=2, samples=1))
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
