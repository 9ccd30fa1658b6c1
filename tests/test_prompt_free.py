"""Prompt-free SAM (negdpo.segmentation.prompt_free): matching and loss against hand-computed cases,
targets, the frozen-SAM wiring, save/load, learning, exact resume, and a tiny end-to-end stage 2 run
(pseudo-labels from `negdpo evaluate` -> seg_train -> `negdpo evaluate --segmenter prompt-free:DIR`)."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from negdpo.segmentation.prompt_free.data import (
    box_of,
    make_targets,
    read_label_mask,
    resolve_target_dir,
    split_targets,
)
from negdpo.segmentation.prompt_free.inference import load_trainable, save_prompt_free
from negdpo.segmentation.prompt_free.matching import LossWeights, hungarian_match, match_cost, set_loss
from negdpo.segmentation.prompt_free.model import PromptFreeConfig, PromptSAM, level_indices, moment_boxes
from PIL import Image


def micro_sam(img_size: int = 128):
    """A seeded random SAM built from segment_anything's own modules, 8x8 embedding grid: the code paths of
    the real models at a fraction of the tiny preset's cost (its 1024-px input makes each step ~2 s on CPU)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    grid = img_size // 16
    enc = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=32, depth=4, num_heads=2, out_chans=64,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=0)
    prompt = PromptEncoder(embed_dim=64, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
                           mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128,
                                                                             num_heads=4),
                      transformer_dim=64, iou_head_depth=2, iou_head_hidden_dim=64)
    return Sam(enc, prompt, dec).eval()


def one_target(mask: np.ndarray, label: int = 0) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([label]), "boxes": torch.as_tensor(box_of(mask))[None],
            "masks": torch.as_tensor(mask, dtype=torch.float32)[None]}


# ------------------------------------------------------------------------------------------------ matching
def test_level_indices_are_quarter_half_three_quarter_depth():
    assert level_indices(12, (0.25, 0.5, 0.75)) == [2, 5, 8]  # vit_b: after blocks 3, 6, 9
    assert level_indices(32, (0.25, 0.5, 0.75)) == [7, 15, 23]  # vit_h
    assert level_indices(2, (0.25, 0.5, 0.75)) == [0, 0, 1]  # tiny preset


def test_hungarian_picks_the_minimum_cost_permutation():
    rng = np.random.default_rng(0)
    for n, t in ((3, 3), (5, 3), (4, 1), (6, 4)):
        for _ in range(5):
            cost = torch.as_tensor(rng.random((n, t)))
            rows, cols = hungarian_match(cost)
            assert sorted(cols.tolist()) == list(range(t)) and len(set(rows.tolist())) == t
            best = min(sum(cost[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(n), t))
            assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-12)


def test_match_cost_hand_computed():
    # query: p(class 0) = 0.5, box (0.5, 0.5, 0.2, 0.2), mask logits 0 on 4 pixels; target: class 0,
    # box (0.4, 0.5, 0.2, 0.4), mask [1, 1, 0, 0]. L1 = 0.1 + 0.2; IoU = 0.02 / 0.10, enclosing 0.12 ->
    # GIoU = 0.2 - 0.02 / 0.12; BCE = ln 2; Dice loss = 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4.
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.4]]),
              "masks": torch.tensor([[1.0, 1.0, 0.0, 0.0]])}
    w = LossWeights()
    cost = match_cost(torch.zeros(1, 2), torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.zeros(1, 4), target, w)
    giou = 0.2 - 0.02 / 0.12
    expected = -w.cls * 0.5 + w.l1 * 0.3 - w.giou * giou + w.bce * math.log(2) + w.dice * 0.4
    assert float(cost[0, 0]) == pytest.approx(expected, abs=1e-5)


def test_matching_swaps_crossed_queries():
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[1:3, 1:4], b[5:8, 4:8] = True, True
    targets = {k: torch.cat([one_target(a)[k], one_target(b)[k]]) for k in ("labels", "boxes", "masks")}
    logits = torch.tensor([[5.0, -5.0], [5.0, -5.0]])
    boxes = targets["boxes"].flip(0)  # query 0 predicts target 1, query 1 target 0
    masks = (targets["masks"].flip(0) * 2 - 1) * 10
    rows, cols = hungarian_match(match_cost(logits, boxes, masks.flatten(1), targets, LossWeights()))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def _perfect(targets: dict[str, torch.Tensor], n: int, num_classes: int = 1) -> dict[str, torch.Tensor]:
    """Outputs whose first T queries are the targets (class logit +20) and the rest confident 'no object'."""
    t, hw = targets["labels"].numel(), targets["masks"].shape[1:]
    logits = torch.full((n, num_classes + 1), -20.0)
    logits[torch.arange(t), targets["labels"]] = 20.0
    logits[t:, num_classes] = 20.0
    boxes = torch.full((n, 4), 0.5)
    boxes[:t] = targets["boxes"]
    masks = torch.full((n, *hw), -20.0)
    masks[:t] = (targets["masks"] * 2 - 1) * 20
    return {"logits": logits[None], "boxes": boxes[None], "masks": masks[None], "aux_masks": masks[None].clone()}


def test_perfect_prediction_is_the_floor_and_perturbations_cost_more():
    a, b = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    a[2:6, 3:9], b[10:15, 10:13] = True, True
    targets = {k: torch.cat([one_target(a)[k], one_target(b)[k]]) for k in ("labels", "boxes", "masks")}
    perfect = _perfect(targets, n=4)
    w = LossWeights()
    floor, _ = set_loss(perfect, [targets], w, 1)
    assert 0 <= float(floor) < 1e-3
    perturb = {
        "class": lambda o: o["logits"][0, 0].copy_(torch.tensor([-20.0, 20.0])),
        "box": lambda o: o["boxes"][0, 1, :2].add_(0.05),
        "mask": lambda o: o["masks"][0, 0, 2:6, 3:5].fill_(-20.0),
        "aux": lambda o: o["aux_masks"][0, 1].fill_(-20.0),
        "spurious": lambda o: o["logits"][0, 3].copy_(torch.tensor([20.0, -20.0])),
    }
    for name, fn in perturb.items():
        out = {k: v.clone() for k, v in perfect.items()}
        fn(out)
        loss, _ = set_loss(out, [targets], w, 1)
        assert float(loss) > float(floor) + 1e-2, name
    rng = torch.Generator().manual_seed(0)
    rand = {"logits": torch.randn(1, 4, 2, generator=rng), "boxes": torch.rand(1, 4, 4, generator=rng),
            "masks": torch.randn(1, 4, 16, 16, generator=rng), "aux_masks": torch.randn(1, 4, 16, 16, generator=rng)}
    assert float(set_loss(rand, [targets], w, 1)[0]) > float(floor)


def test_loss_is_invariant_to_query_order():
    gen = torch.Generator().manual_seed(1)
    a = np.zeros((12, 12), bool)
    a[2:7, 4:10] = True
    b = np.zeros((12, 12), bool)
    b[8:11, 1:3] = True
    targets = [{k: torch.cat([one_target(a)[k], one_target(b, 1)[k]]) for k in ("labels", "boxes", "masks")},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 12, 12)}]
    out = {"logits": torch.randn(2, 5, 3, generator=gen), "boxes": torch.rand(2, 5, 4, generator=gen) * 0.5 + 0.25,
           "masks": torch.randn(2, 5, 12, 12, generator=gen), "aux_masks": torch.randn(2, 5, 12, 12, generator=gen)}
    w = LossWeights()
    base, logs = set_loss(out, targets, w, 2)
    for seed in range(3):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        loss, _ = set_loss({k: v[:, perm] for k, v in out.items()}, targets, w, 2)
        assert float(loss) == pytest.approx(float(base), rel=1e-6)
    assert set(logs) >= {"loss/class", "loss/l1", "loss/giou", "loss/mask_bce", "loss/mask_dice", "loss/aux_dice"}


def test_no_object_class_is_down_weighted():
    # 2 queries, 1 target: query 0 matched (class 0), query 1 -> "no object" with weight 0.1:
    # CE = (1 * l0 + 0.1 * l1) / (1 + 0.1), l = -log softmax.
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    target = one_target(mask)
    logits = torch.tensor([[[1.0, 0.0], [0.5, 0.2]]])
    out = {"logits": logits, "boxes": target["boxes"].repeat(2, 1)[None],
           "masks": ((target["masks"] * 2 - 1) * 20).repeat(2, 1, 1)[None]}
    out["masks"][0, 1] = -20  # query 1 is the worse mask: query 0 gets the target
    _, logs = set_loss(out, [target], LossWeights(aux_weight=0), 1)
    lsm = torch.log_softmax(logits[0], -1)
    expected = (-lsm[0, 0] - 0.1 * lsm[1, 1]) / 1.1
    assert logs["loss/class"] == pytest.approx(float(expected), rel=1e-6)
    _, empty = set_loss(out, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                               "masks": torch.zeros(0, 4, 4)}], LossWeights(), 1)
    assert empty["loss/class"] == pytest.approx(float(-lsm[:, 1].mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------------ targets
def test_targets_components_classes_and_boxes(tmp_path):
    labels = np.zeros((10, 20), np.int64)
    labels[2:5, 3:7] = 1  # two components of class 0, one of class 1
    labels[7:9, 15:18] = 1
    labels[6:8, 1:3] = 2
    labels[0, 19] = 1  # a one-pixel speck
    comps = split_targets(labels, "components", min_area=2)
    assert sorted((c, int(m.sum())) for c, m in comps) == [(0, 6), (0, 12), (1, 4)]
    classes = split_targets(labels, "classes")
    assert [(c, int(m.sum())) for c, m in classes] == [(0, 19), (1, 4)]
    m = labels == 0
    m[:] = False
    m[2:5, 3:7] = True  # x in [3, 7), y in [2, 5) of a 20 x 10 image
    np.testing.assert_allclose(box_of(m), [5 / 20, 3.5 / 10, 4 / 20, 3 / 10])
    raw = np.zeros((10, 20), np.uint8)
    raw[labels == 1], raw[labels == 2] = 128, 255
    Image.fromarray(raw).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "m.png", [128, 255]), labels)
    np.testing.assert_array_equal(read_label_mask(tmp_path / "m.png", None), (labels > 0).astype(np.int64))
    # mask frame: a 64-px image into SAM's 1024 input / 256 mask frame is a 4x upsampling, no padding;
    # a 32 x 64 image is padded below (rows 128..255 empty)
    t = make_targets(labels.repeat(4, 0).repeat(4, 1)[:, :64], (512, 1024), 1024, 256)
    assert t["masks"].shape[1:] == (256, 256) and not t["masks"][:, 128:].any()


def test_target_folders(tmp_path):
    (tmp_path / "ph" / "train_masks").mkdir(parents=True)
    assert resolve_target_dir(tmp_path / "ph", "train") == tmp_path / "ph" / "train_masks"
    flat = tmp_path / "eval1"
    (flat / "masks").mkdir(parents=True)
    (flat / "masks" / "a.png").touch()
    assert resolve_target_dir(tmp_path / "ph", "train", str(flat)) == flat / "masks"
    multi = tmp_path / "eval2"
    for name in ("base", "dpo"):
        (multi / "masks" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match="several checkpoints"):
        resolve_target_dir(tmp_path / "ph", "train", str(multi))
    assert resolve_target_dir(tmp_path / "ph", "train", str(multi), "dpo") == multi / "masks" / "dpo"
    with pytest.raises(FileNotFoundError):
        resolve_target_dir(tmp_path / "ph", "train", str(multi), "nope")


def test_moment_boxes_of_a_uniform_rectangle():
    prob = torch.zeros(1, 1, 32, 32)
    prob[0, 0, 4:12, 8:24] = 1.0  # x in [8, 24), y in [4, 12)
    box = moment_boxes(prob, torch.ones(1, 1, 32, 32))[0, 0]
    np.testing.assert_allclose(box.numpy(), [0.5, 0.25, 0.5, 0.25], atol=0.01)
    valid = torch.zeros(1, 1, 32, 32)
    valid[..., :16, :] = 1  # only the top half is the image: y is normalised to 16 rows
    box = moment_boxes(prob * valid, valid)[0, 0]
    np.testing.assert_allclose(box.numpy(), [0.5, 0.5, 0.5, 0.5], atol=0.02)


# ------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def sam():
    return micro_sam()


def test_frozen_sam_hooks_and_zero_init_adapters(sam):
    x = torch.randn(1, 3, 128, 128)
    hw = torch.tensor([[128, 96]])
    torch.manual_seed(0)
    plain = PromptSAM(sam, PromptFreeConfig(num_queries=3, hidden_dim=16, decoder_adapters=False))
    assert plain.levels == [0, 1, 2]
    assert not any(p.requires_grad for p in sam.parameters())
    # the hooked features are the blocks' outputs and the neck's (checked against a manual pass)
    feats = plain.encode(x)
    with torch.no_grad():
        h = sam.image_encoder.patch_embed(x) + sam.image_encoder.pos_embed
        manual = []
        for blk in sam.image_encoder.blocks:
            h = blk(h)
            manual.append(h)
    for k, i in enumerate(plain.levels):
        torch.testing.assert_close(feats["blocks"][k], manual[i])
    torch.testing.assert_close(feats["neck"], sam.image_encoder.neck(manual[-1].permute(0, 3, 1, 2)))
    with torch.no_grad():
        a = plain(images=x, input_hw=hw)
    torch.manual_seed(0)
    adapted = PromptSAM(sam, PromptFreeConfig(num_queries=3, hidden_dim=16, decoder_adapters=True,
                                             encoder_adapters=True))
    assert all(not k.startswith("sam.") for k in adapted.trainable_state_dict())
    with pytest.raises(KeyError):  # one generator per SAM: building the second detached the first
        plain.encode(x)
    with torch.no_grad():
        b = adapted(images=x, input_hw=hw)
    for key in ("masks", "aux_masks", "boxes", "logits", "iou"):  # zero-init adapters: the same model
        torch.testing.assert_close(a[key], b[key])
    assert a["masks"].shape == (1, 3, 32, 32) and a["boxes"].shape == (1, 3, 4) and a["logits"].shape == (1, 3, 2)
    assert (a["masks"][..., 24:] < 0).all()  # columns of SAM's padding (w' = 96 of 128) are background
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    loss = adapted(images=x, input_hw=hw)["masks"].sum()
    loss.backward()
    assert all(p.grad is None for p in sam.parameters())
    assert adapted.encoder_adapters["0"].up.weight.grad is not None  # gradients reach the encoder adapters
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())
    adapted.remove_hooks()
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(x), feats["neck"])  # plain SAM again


def test_target_frame_matches_the_valid_region(sam):
    """A full-image target covers exactly the region the model treats as image (not SAM's padding)."""
    from negdpo.segmentation.prompt_free.data import input_size, to_mask_frame

    model = PromptSAM(sam, PromptFreeConfig(num_queries=1, hidden_dim=8))
    for hw in ((300, 200), (301, 200), (90, 128), (64, 64)):
        ihw = input_size(hw, 128)
        full = to_mask_frame(np.ones((1, *hw), bool), ihw, 128, 32)[0]
        torch.testing.assert_close(full, model.valid_mask(torch.tensor([ihw]), torch.device("cpu"))[0, 0])
    model.remove_hooks()


def test_save_load_round_trip(sam, tmp_path):
    torch.manual_seed(3)
    model = PromptSAM(sam, PromptFreeConfig(num_queries=2, hidden_dim=16))
    for p in model.generator.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    save_prompt_free(model, tmp_path, {"score_threshold": 0.4})
    x, hw = torch.randn(1, 3, 128, 128), torch.tensor([[128, 128]])
    with torch.no_grad():
        expected = model(images=x, input_hw=hw)["masks"]
    torch.manual_seed(4)
    other = PromptSAM(sam, PromptFreeConfig(num_queries=2, hidden_dim=16))
    with torch.no_grad():
        assert not torch.allclose(other(images=x, input_hw=hw)["masks"], expected)
    load_trainable(other, tmp_path / "prompt_generator.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other(images=x, input_hw=hw)["masks"], expected)
    meta = json.loads((tmp_path / "prompt_generator.json").read_text())
    assert meta["generator"]["num_queries"] == 2 and meta["score_threshold"] == 0.4
    with pytest.raises(ValueError, match="do not fit"):
        load_trainable(PromptSAM(sam, PromptFreeConfig(num_queries=3, hidden_dim=16)),
                       tmp_path / "prompt_generator.safetensors")


# ------------------------------------------------------------------------------------------------ training
def _cfg(out: Path, data: Path, **kw):
    from negdpo.segmentation.prompt_free.train import SegTrainConfig

    base = dict(output_dir=str(out), data=str(data), report_to="none", num_queries=2, hidden_dim=32,
                train_batch_size=4, max_train_images=8, eval_images=8, learning_rate=1e-2, logging_steps=10)
    return SegTrainConfig(**{**base, **kw})


@pytest.mark.integration
def test_training_lowers_the_loss_and_raises_dice(phantom_dir, sam, tmp_path):
    """40 steps on 6 phantom training images (ground-truth targets) against the untrained generator.

    Measured, seeds 0-3: set loss x0.47 / 0.45 / 0.51 / 0.47; Dice of the generator's masks +0.45 / +0.50 /
    +0.27 / +0.44 (seed 0: 0.33 -> 0.79; 0.33 = the two lesion-free images, empty = empty); learning rate
    1e-9: no change. SAM's final masks are not asserted: the micro SAM is random and frozen, so its
    decoder barely follows prompts (with real SAM weights it does)."""
    from negdpo.segmentation.prompt_free.train import train

    summary = train(_cfg(tmp_path / "run", phantom_dir, max_train_steps=40, max_train_images=6, eval_images=6,
                         train_batch_size=2, learning_rate=0.02), sam=sam)
    b, a = summary["before"], summary["after"]
    assert summary["targets"] >= 4 and summary["feature_cache"]
    assert a["loss"] < 0.6 * b["loss"]
    assert a["aux_dice"] > b["aux_dice"] + 0.2
    assert (tmp_path / "run" / "final" / "prompt_generator.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_resume_is_exact(phantom_dir, sam, tmp_path):
    """3 steps straight == 2 steps, checkpoint, resume for the third (data order is a function of the step)."""
    from negdpo.segmentation.prompt_free.train import train
    from safetensors.torch import load_file

    kw = dict(max_train_steps=3, eval_images=0, max_train_images=6, train_batch_size=2, logging_steps=1)
    train(_cfg(tmp_path / "a", phantom_dir, checkpointing_steps=2, **kw), sam=sam)
    assert (tmp_path / "a" / "checkpoint-2").is_dir()
    (tmp_path / "a" / "final" / "prompt_generator.safetensors").rename(tmp_path / "straight.safetensors")
    summary = train(_cfg(tmp_path / "a", phantom_dir, resume_from_checkpoint="latest", **kw), sam=sam)
    assert summary["steps"] == 3
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(
        tmp_path / "a" / "final" / "prompt_generator.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(straight[k], resumed[k])
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.integration
def test_end_to_end_pseudo_labels_train_evaluate(phantom_dir, tmp_path):
    """Stage 2 on the tiny SAM preset: oracle zero-shot masks of the train split are the pseudo-labels; a
    2-step generator is evaluated prompt-free with the same outputs as the zero-shot chain."""
    import csv

    from negdpo.segmentation.cli import main as evaluate_main
    from negdpo.segmentation.prompt_free.train import main as train_main

    pseudo, run, ev = tmp_path / "pseudo", tmp_path / "gen", tmp_path / "eval"
    assert evaluate_main(["--data", str(phantom_dir), "--split", "train", "--saliency", "oracle", "--sam", "none",
                          "--post", "threshold", "--no_control", "--bootstrap", "0", "--limit", "3", "--out", str(pseudo)]) == 0
    assert train_main(["--data", str(phantom_dir), "--targets", str(pseudo), "--output_dir", str(run),
                       "--max_train_steps", "2", "--num_queries", "2", "--train_batch_size", "1",
                       "--max_train_images", "3", "--eval_images", "0", "--report_to", "none"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["targets"] >= 1
    assert evaluate_main(["--data", str(phantom_dir), "--split", "val", "--segmenter", f"prompt-free:{run}",
                          "--limit", "2", "--bootstrap", "0", "--out", str(ev)]) == 0
    rows = list(csv.DictReader((ev / "metrics.csv").open()))
    assert [r["checkpoint"] for r in rows] == ["prompt-generator"] * 2 and all(r["positive"] == "1" for r in rows)
    for r in rows:
        assert 0 <= float(r["dice"]) <= 1 and (ev / r["mask_path"]).is_file() and (ev / r["overlay_path"]).is_file()
    assert "prompt-generator" in json.loads((ev / "summary.json").read_text())["checkpoints"]
    for bad in ("prompt-free", f"prompt-free:{tmp_path / 'missing'}"):  # fails before writing
        assert evaluate_main(["--data", str(phantom_dir), "--segmenter", bad, "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.integration  # a subprocess or a training chain: out of the inner loop
def test_old_package_name_is_a_deprecated_alias_of_prompt_free(tmp_path):
    """``negdpo.segmentation.prompt_generator`` (renamed to ``prompt_free``) still imports for one release: it
    warns, its submodules are the renamed ones (the same objects) and the old object names resolve."""
    import subprocess
    import sys

    code = ("import warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import negdpo.segmentation.prompt_generator\nexcept DeprecationWarning as e:\n"
            "    print('warned', 'prompt_free' in str(e))\n"
            "warnings.simplefilter('ignore')\n"
            "import negdpo.segmentation.prompt_generator as old, negdpo.segmentation.prompt_free as new\n"
            "from negdpo.segmentation.prompt_generator.train import SegTrainConfig\n"
            "import negdpo.segmentation.prompt_free.train as t\n"
            "print(SegTrainConfig is t.SegTrainConfig, old.GeneratorConfig is new.PromptFreeConfig,\n"
            "      old.load_prompt_generator is new.load_prompt_free, old.PromptSAM is new.PromptSAM)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["warned", "True", "True", "True", "True", "True"], out.stderr[-2000:]


def test_segmenter_spelling_old_prefix_warns_and_bad_ones_fail(tmp_path):
    from negdpo.segmentation.prompt_free.evaluation import prompt_free_dir

    assert prompt_free_dir("sam") is None
    for bad in ("prompt-free:", "prompt-free", "generator:x", ""):
        with pytest.raises(ValueError, match="use sam or prompt-free:DIR"):
            prompt_free_dir(bad)
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "prompt_generator.json").write_text("{}")  # the saved file keeps its name
    assert prompt_free_dir(f"prompt-free:{tmp_path / 'run'}") == tmp_path / "run" / "final"
    with pytest.warns(DeprecationWarning, match="prompt-free:DIR"):  # the old spelling reaches the same folder
        assert prompt_free_dir(f"prompt-generator:{tmp_path / 'run'}") == tmp_path / "run" / "final"
    with pytest.raises(FileNotFoundError):
        prompt_free_dir(f"prompt-free:{tmp_path / 'missing'}")
