"""Pre-training the tiny SAM on the pre-training pool (negdpo.segmentation.sam_pretrain)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from negdpo.core.config import ConfigError
from negdpo.core.models import load_sam
from negdpo.core.models.sam import arch_path, build_sam_arch
from negdpo.segmentation.postprocess import boxes_from_mask
from negdpo.segmentation.sam_pretrain import (
    SamPretrainConfig,
    init_pos_embed,
    jittered_box,
    load_pool,
    point_prompt,
    pretrain_sam,
    split_pool,
    structure_masks,
    validate,
)

MICRO = {"img_size": 64, "patch_size": 8, "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 2,
         "prompt_embed_dim": 32, "decoder_mlp_dim": 64, "decoder_num_heads": 2, "iou_head_hidden_dim": 32}


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """4 eval subjects + a 10-subject pre-training pool, 64 px, one slice each."""
    from negdpo.core.phantoms import ensure_phantoms

    return ensure_phantoms(tmp_path_factory.mktemp("pool"), n=4, size=64, slices=1, seed=0, pretrain_n=10,
                           lesion_area=(0.03, 0.12), preview=False)


def micro_cfg(pool_dir, out, **kw) -> SamPretrainConfig:
    base = dict(output_dir=str(out), data=str(pool_dir), train_batch_size=2, prompts_per_image=8,
                max_train_steps=150, learning_rate=3e-3, lr_scheduler="constant", lr_warmup_steps=5, lesion_share=0.8,
                val_fraction=0.2, logging_steps=10, min_structure_area=0.01, **MICRO)
    return SamPretrainConfig(**{**base, **kw})


def disk(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def test_only_the_pretraining_pool_is_accepted():
    assert SamPretrainConfig().split == "pretrain"
    for split in ("train", "val", "test"):
        with pytest.raises(ConfigError, match="split"):
            SamPretrainConfig(split=split)


def test_jittered_box_contains_the_mask_up_to_the_jitter():
    mask = disk(64, 30, 34, 9)
    tight = boxes_from_mask(mask)[0]
    assert np.array_equal(jittered_box(mask, 0.0, np.random.default_rng(0)), tight)
    rng = np.random.default_rng(1)
    boxes = np.stack([jittered_box(mask, 0.1, rng) for _ in range(400)])
    side = np.array([tight[2] - tight[0], tight[3] - tight[1]] * 2)
    assert (np.abs(boxes - tight) <= 20).all() and (boxes >= 0).all() and (boxes <= 63).all()
    assert (boxes[:, :2] <= boxes[:, 2:]).all()
    # |N(0, (0.1 side)^2)| has mean 0.1 side sqrt(2/pi)
    assert np.abs(boxes - tight).mean(0) == pytest.approx(0.1 * side * np.sqrt(2 / np.pi), rel=0.15)


def test_points_inside_and_negatives_outside():
    mask = disk(64, 20, 40, 6)
    rng = np.random.default_rng(0)
    for n_pos, n_neg in ((1, 0), (3, 1), (2, 1)):
        pts, lbl = point_prompt(mask, n_pos, n_neg, rng)
        assert pts.shape == (n_pos + n_neg, 2) and lbl.tolist() == [1] * n_pos + [0] * n_neg
        inside = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        assert inside.tolist() == [True] * n_pos + [False] * n_neg


def test_structures_found_without_labels():
    """A head (grey ellipse) with a dark ventricle and a bright blob: all three come back as targets."""
    head = disk(96, 48, 48, 40)
    dark, bright = disk(96, 35, 40, 8), disk(96, 62, 58, 10)
    image = np.where(head, 0.5, 0.0) - 0.4 * dark + 0.4 * bright
    found = structure_masks(image, min_area=0.005)

    def best_iou(m):
        return max((m & f).sum() / (m | f).sum() for f in found)

    assert best_iou(head) > 0.95 and best_iou(dark) > 0.8 and best_iou(bright) > 0.8
    assert all(0.005 * image.size <= f.sum() <= 0.7 * image.size for f in found)


def test_held_out_pool_subjects_are_whole_subjects(pool_dir):
    pool = load_pool(pool_dir, "pretrain", 64, 0.01, 0.7)
    train, val = split_pool(pool, 0.2, 0)
    assert len(val) == 2 and {p.subject for p in train}.isdisjoint({p.subject for p in val})
    assert all("_p" in p.name for p in pool)  # the pool only, never an eval subject


@pytest.mark.integration
def test_pretraining_learns_and_the_checkpoint_round_trips(pool_dir, tmp_path):
    cfg = micro_cfg(pool_dir, tmp_path / "run")
    summary = pretrain_sam(cfg)
    ckpt = summary["checkpoint"]
    assert json.loads(arch_path(ckpt).read_text())["img_size"] == 64
    # Dice of box prompts on the training pool's lesions: random init vs trained
    pool = load_pool(pool_dir, "pretrain", 64, 0.01, 0.7)
    train, val = split_pool(pool, cfg.val_fraction, cfg.seed)
    torch.manual_seed(0)
    init = build_sam_arch(cfg.arch())
    init_pos_embed(init)
    before = validate(init, train)["val_box_dice"]
    sam = load_sam("tiny", checkpoint=ckpt)
    after = validate(sam, train)["val_box_dice"]
    assert before < 0.2 and after > 0.5, (before, after)
    # the reloaded model reproduces the in-run validation exactly
    again = validate(sam, val)
    assert again["val_box_dice"] == summary["val_box_dice"] and again["val_point_dice"] == summary["val_point_dice"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert losses[-1] < 0.7 * losses[0]


def test_resume_reproduces_the_uninterrupted_run(pool_dir, tmp_path):
    full = pretrain_sam(micro_cfg(pool_dir, tmp_path / "a", max_train_steps=6, val_fraction=0.0))
    pretrain_sam(micro_cfg(pool_dir, tmp_path / "b", max_train_steps=6, val_fraction=0.0, checkpointing_steps=3))
    ckpt3 = tmp_path / "b" / "checkpoint-3"
    assert ckpt3.is_dir()
    resumed = pretrain_sam(micro_cfg(pool_dir, tmp_path / "b", max_train_steps=6, val_fraction=0.0,
                                     resume_from_checkpoint=str(ckpt3)))
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_preset_without_checkpoint_is_unchanged():
    """``load_sam('tiny')`` keeps the 1024-px, 32-wide preset; a checkpoint path must exist."""
    from negdpo.core.models import ModelNotAvailableError

    sam = load_sam("tiny")
    assert sam.image_encoder.img_size == 1024 and sam.image_encoder.patch_embed.proj.out_channels == 32
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_sam("tiny", checkpoint="/nonexistent/sam.pth")
    with pytest.raises(ValueError, match="unknown SAM architecture"):
        build_sam_arch({"img_sise": 64})
