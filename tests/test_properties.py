"""Property tests (hypothesis) of the math: laws that hold for every input, not just hand-picked ones.

Loss symmetry (swapping chosen and rejected), log 2 at init, metric bounds and identities, permutation
invariance of batch losses, MI estimator laws. Small example counts keep the file fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)
seeds = st.integers(0, 2**31 - 1)


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- Diffusion-DPO
@FAST
@given(seed=seeds, n=st.integers(1, 6), beta=st.floats(1.0, 1e4))
def test_diffusion_dpo_log2_at_init_and_swap_symmetry(seed, n, beta):
    from negdpo.generator.losses import diffusion_dpo_loss

    g = _rng(seed)
    ew, el, rw, rl = (torch.rand(n, generator=g, dtype=torch.float64) * 0.2 for _ in range(4))
    loss, m = diffusion_dpo_loss(ew, el, ew.clone(), el.clone(), beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert m["rewards/margins"].item() == 0.0
    for i in range(n):  # per pair: sigma(z) + sigma(-z) = 1, margins and rewards swap
        one = [x[i:i + 1] for x in (ew, el, rw, rl)]
        a, ma = diffusion_dpo_loss(*one, beta)
        b, mb = diffusion_dpo_loss(one[1], one[0], one[3], one[2], beta)
        assert math.exp(-a.item()) + math.exp(-b.item()) == pytest.approx(1.0, abs=1e-9)
        assert ma["rewards/margins"].item() == pytest.approx(-mb["rewards/margins"].item(), abs=1e-9)
        assert ma["rewards/chosen"].item() == pytest.approx(mb["rewards/rejected"].item(), abs=1e-9)
        assert ma["implicit_acc_ties_half"].item() + mb["implicit_acc_ties_half"].item() == 1.0


@FAST
@given(seed=seeds, mu=st.floats(0.0, 1.0), gamma=st.floats(0.0, 2.0))
def test_sdpo_lambda_in_unit_interval_and_all_ones_weight_is_plain(seed, mu, gamma):
    from negdpo.generator.losses import per_sample_error, sdpo_lambda

    g = _rng(seed)
    pw, pl, tgt = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    weight = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    lam = sdpo_lambda(pw, tgt, pl, tgt, mu, weight, gamma).item()
    assert 0.0 <= lam <= 1.0
    ones = torch.ones(2, 1, 4, 4)
    torch.testing.assert_close(per_sample_error(pw, tgt, ones), per_sample_error(pw, tgt))
    assert sdpo_lambda(pw, tgt, pl, tgt, mu, ones).item() == pytest.approx(
        sdpo_lambda(pw, tgt, pl, tgt, mu).item(), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------ CLIP losses
@FAST
@given(seed=seeds, n=st.integers(1, 6), beta=st.floats(0.01, 10.0))
def test_clip_dpo_log2_at_init_and_swap_symmetry(seed, n, beta):
    from negdpo.preference.clip.losses import clip_dpo_loss

    g = _rng(seed)
    pc, pr, rc, rr = (10 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4))
    assert clip_dpo_loss(pc, pr, pc.clone(), pr.clone(), beta)[0].item() == pytest.approx(math.log(2), abs=1e-12)
    a, ma = clip_dpo_loss(pc, pr, rc, rr, beta, reduce=False)
    b, mb = clip_dpo_loss(pr, pc, rr, rc, beta, reduce=False)
    torch.testing.assert_close(torch.exp(-a) + torch.exp(-b), torch.ones(n, dtype=torch.float64))
    assert ma["rewards/margins"].item() == pytest.approx(-mb["rewards/margins"].item(), abs=1e-9)


@FAST
@given(seed=seeds, n=st.integers(2, 7), mode=st.sampled_from(["paper", "parity"]), alpha=st.sampled_from([0.0, 0.5]),
       dup=st.booleans())
def test_dhn_nce_permutation_and_scale_invariant(seed, n, mode, alpha, dup):
    from negdpo.preference.clip.losses import dhn_nce_loss

    g = _rng(seed)
    v, t = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, max(n // 2, 1), (n,), generator=g) if dup else torch.arange(n)
    perm = torch.randperm(n, generator=g)
    base = dhn_nce_loss(v, t, alpha=alpha, mode=mode, text_ids=ids).item()
    permuted = dhn_nce_loss(v[perm], t[perm], alpha=alpha, mode=mode, text_ids=ids[perm]).item()
    assert permuted == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert dhn_nce_loss(2.5 * v, 0.3 * t, alpha=alpha, mode=mode, text_ids=ids).item() == pytest.approx(
        base, rel=1e-9, abs=1e-9)
    relabelled = dhn_nce_loss(v, t, alpha=alpha, mode=mode, text_ids=ids * 7 + 3).item()
    assert relabelled == pytest.approx(base, rel=1e-12, abs=1e-12)


@FAST
@given(seed=seeds, n=st.integers(2, 7), dup=st.booleans(), scale=st.floats(0.5, 30.0))
def test_contrastive_permutation_invariant_and_bounded(seed, n, dup, scale):
    from negdpo.preference.clip.losses import clip_contrastive_loss

    g = _rng(seed)
    v, t = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, max(n // 2, 1), (n,), generator=g) if dup else None
    if ids is not None:
        t = t[ids]  # one caption id = one caption = one text feature
    perm = torch.randperm(n, generator=g)
    base = clip_contrastive_loss(v, t, scale, ids).item()
    got = clip_contrastive_loss(v[perm], t[perm], scale, None if ids is None else ids[perm]).item()
    assert got == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert base >= -1e-12


# ---------------------------------------------------------------------------------------------- masked MI
@FAST
@given(seed=seeds, k=st.integers(2, 4))
def test_weighted_mi_laws(seed, k):
    """Symmetric, invariant to a shared pixel permutation, and an integer weight k = the pixel repeated k times."""
    from negdpo.generator.mi import weighted_mi

    g = _rng(seed)
    a = torch.rand(1, 40, generator=g, dtype=torch.float64)
    b = (0.5 * a + 0.5 * torch.rand(1, 40, generator=g, dtype=torch.float64)).clamp(0, 1)
    w = (torch.rand(1, 40, generator=g) > 0.3).double()
    w[0, 0] = 1.0
    base = weighted_mi(a, b, w)
    torch.testing.assert_close(weighted_mi(b, a, w), base, rtol=1e-6, atol=1e-9)
    perm = torch.randperm(40, generator=g)
    torch.testing.assert_close(weighted_mi(a[:, perm], b[:, perm], w[:, perm]), base, rtol=1e-5, atol=1e-7)  # fp32
    w2 = w.clone()
    w2[0, 0] = k
    rep = [0] * (k - 1)
    dup = weighted_mi(torch.cat([a, a[:, rep]], 1), torch.cat([b, b[:, rep]], 1), torch.cat([w, w[:, rep]], 1))
    torch.testing.assert_close(weighted_mi(a, b, w2), dup, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weighted_mi(a, b, 3.0 * w), base, rtol=1e-5, atol=1e-7)
    assert base.item() >= -1e-6 and base.item() <= math.log(23)


# ---------------------------------------------------------------------------------------- attention entropy
@FAST
@given(seed=seeds, patches=st.integers(2, 9), prefix=st.integers(1, 3))
def test_attention_entropy_bounds_and_patch_permutation(seed, patches, prefix):
    from negdpo.preference.clip.attention import attention_entropy

    g = _rng(seed)
    n = prefix + patches
    probs = torch.rand(2, 3, n, n, generator=g, dtype=torch.float64).softmax(-1)
    ent = attention_entropy(probs, prefix)
    assert ((ent >= -1e-12) & (ent <= 1 + 1e-12)).all()
    order = torch.cat([torch.arange(prefix), prefix + torch.randperm(patches, generator=g)])
    torch.testing.assert_close(attention_entropy(probs[..., order], prefix), ent)
    raw = attention_entropy(probs, prefix, normalized=False)
    torch.testing.assert_close(raw, ent * math.log(patches))


# ---------------------------------------------------------------------------------------- segmentation metrics
masks = arrays(np.bool_, (12, 12), elements=st.booleans())


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(p=masks, g=masks)
def test_dice_iou_bounds_symmetry_and_identity(p, g):
    from negdpo.segmentation import metrics as M

    d, j = M.dice(p, g), M.iou(p, g)
    assert 0.0 <= d <= 1.0 and 0.0 <= j <= 1.0
    assert d == M.dice(g, p) and j == M.iou(g, p)
    assert d == pytest.approx(2 * j / (1 + j), abs=1e-12)  # Dice and IoU are one monotone function apart
    assert M.dice(p, p) == 1.0 and M.iou(p, p) == 1.0
    assert (d == 1.0) == bool((p == g).all())


@settings(max_examples=5, deadline=None, derandomize=True, database=None)  # MONAI calls are slow
@given(p=masks, g=masks)
def test_nsd_and_hd95_bounds(p, g):
    from negdpo.segmentation import metrics as M

    for mode in ("boundary", "parity"):
        assert 0.0 <= M.nsd(p, g, mode=mode) <= 1.0 + 1e-9
    assert M.nsd(p, p) == pytest.approx(1.0)
    h = M.hd95(p, g)
    if p.any() and g.any():
        assert 0.0 <= h <= math.hypot(11, 11) + 1e-9 and h == pytest.approx(M.hd95(g, p))
        assert M.hd95(p, p) == 0.0
    elif p.any() or g.any():
        assert math.isnan(h)
    else:
        assert h == 0.0
