"""Judges, schema helpers and latent-boundary negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage


def _positives(phantom_dir):
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(phantom_dir)
    return [s for split in folder.splits() for s in folder.load_split(split) if s.positive]


def _item(scan):
    from negdpo.preference.pairs.judges import JudgeItem

    return JudgeItem(scan.image, ndimage.binary_dilation(scan.mask, iterations=2), scan.prompt,
                     "A scan with no tumour.", None)


def test_judge_ranks_twin_above_positive(phantom_dir, tiny_clip):
    """Without looking at the twin, the default judge prefers the healthy twin to the positive."""
    from negdpo.preference.pairs.judges import CompositeJudge

    judge = CompositeJudge("clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5", clip=tiny_clip)
    scans = _positives(phantom_dir)
    wins = [bool(np.diff(judge(_item(s), [s.image, s.twin])[0])[0] > 0) for s in scans]
    assert len(scans) >= 10 and np.mean(wins) >= 0.9, wins
    twin_judge = CompositeJudge("twin")
    for s in scans[:4]:
        it = _item(s)
        it.twin = s.twin
        scores, parts = twin_judge(it, [s.image, s.twin])
        assert scores[1] == pytest.approx(1.0) and scores[0] < 1.0 and parts[0].keys() == {"twin"}


def test_judge_spec_and_missing_twin():
    from negdpo.preference.pairs.judges import CompositeJudge, JudgeItem, parse_spec

    assert parse_spec("contrast=2,twin") == {"contrast": 2.0, "twin": 1.0}
    with pytest.raises(ValueError, match="unknown judge"):
        parse_spec("contrast,lpips")
    img = np.full((32, 32), 0.5, np.float32)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    judge = CompositeJudge("contrast,twin,fidelity_out")
    scores, parts = judge(JudgeItem(img, mask, "t", "h"), [img, np.clip(img + 0.3 * mask, 0, 1)])
    assert "twin" not in parts[0] and scores[0] > scores[1]  # the twin judge abstains without a twin


def test_harmonic_fill_reproduces_a_linear_ramp():
    from negdpo.preference.pairs.judges import harmonic_fill

    ramp = np.tile(np.linspace(0, 1, 40), (40, 1))
    mask = np.zeros_like(ramp, bool)
    mask[12:30, 8:25] = True
    holed = ramp.copy()
    holed[mask] = 0.0
    assert np.abs(harmonic_fill(holed, mask) - ramp).max() < 1e-9


def test_masked_mi_ignores_the_inside():
    from negdpo.preference.pairs.judges import JudgeItem, MaskedMIJudge

    rng = np.random.default_rng(0)
    src = rng.random((32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    other = src.copy()
    other[mask] = rng.random(mask.sum())
    s = MaskedMIJudge()(JudgeItem(src, mask, "", ""), [src, other, rng.random((32, 32)).astype(np.float32)])
    assert s[0] == pytest.approx(1.0, abs=1e-5) and s[1] == pytest.approx(s[0]) and s[2] < 0.5
    from negdpo.generator.mi import weighted_mi
    from negdpo.preference.pairs.judges import parzen_mi

    w = (~mask).astype(np.float32)
    ref = weighted_mi(torch.from_numpy(other)[None], torch.from_numpy(src)[None], torch.from_numpy(w)[None])
    assert parzen_mi(other, src, w) == pytest.approx(float(ref[0]), rel=1e-4)  # the generator's masked MI


def test_difficulty_and_features():
    from datasets import Array2D
    from negdpo.preference.pairs.build import split_evenly
    from negdpo.preference.pairs.schema import difficulty_of, features_for

    d = [difficulty_of(m) for m in (0.0, 0.01, 0.1, 1.0)]
    assert d[0] == (1.0, 2) and all(a[0] > b[0] for a, b in zip(d, d[1:])) and d[-1][1] == 0
    f = features_for("generator", (64, 64))
    assert isinstance(f["chosen_f32"], Array2D) and f["pair_id"].dtype == "string"
    with pytest.raises(ValueError):
        features_for("nope")
    seq = list(range(11))
    parts = [split_evenly(seq, r, 3) for r in range(3)]
    assert sum(parts, []) == seq and [len(p) for p in parts] == [4, 4, 3]


def test_latent_boundary_stays_in_the_mask(phantom_dir, tiny_sd_path, tiny_clip):
    from diffusers import AutoencoderKL
    from negdpo.preference.pairs.boundary import BoundaryConfig, LatentBoundary, zero_shot_logit_fn
    from negdpo.preference.pairs.judges import ClipLesionJudge

    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    scans = _positives(phantom_dir)[:2]
    masks = [ndimage.binary_dilation(s.mask, iterations=2) for s in scans]
    judge = ClipLesionJudge(tiny_clip)
    tf = torch.stack([judge.text_features("healthy scan", s.prompt) for s in scans])
    logit_fn = zero_shot_logit_fn(judge.model, tf)
    lb = LatentBoundary(vae, 64, BoundaryConfig(steps=4, margin=5.0))
    outs = lb([s.image for s in scans], masks, [1, 2], logit_fn)
    for s, m, o in zip(scans, masks, outs):
        assert o.shape == s.image.shape and np.array_equal(o[~m], s.image[~m])
        assert np.isfinite(o).all() and np.abs(o - s.image)[m].mean() > 0
    assert (lb.last_logits < lb.first_logits).all()  # moved toward the healthy side
    again = LatentBoundary(vae, 64, lb.cfg)([s.image for s in scans], masks, [1, 2], logit_fn)
    assert all(np.array_equal(a, b) for a, b in zip(outs, again))  # seeded: deterministic


def test_judge_mi_is_the_training_mi_formula():
    """One MI formula, two backends: the judges' float64 NumPy estimate (thread-count independent scores)
    equals the training regulariser's autograd estimate."""
    import torch
    from negdpo.generator.mi import weighted_mi
    from negdpo.preference.pairs.judges import parzen_mi

    rng = np.random.default_rng(0)
    a, b = rng.random((16, 16)), rng.random((16, 16))
    b = 0.6 * a + 0.4 * b
    w = (rng.random((16, 16)) > 0.3).astype(np.float64)
    ref = weighted_mi(torch.from_numpy(a)[None].float(), torch.from_numpy(b)[None].float(),
                      torch.from_numpy(w)[None].float())[0]
    assert abs(parzen_mi(a, b, w) - float(ref)) < 1e-5
    assert abs(parzen_mi(a, b) - float(weighted_mi(torch.from_numpy(a)[None].float(),
                                                   torch.from_numpy(b)[None].float())[0])) < 1e-5
