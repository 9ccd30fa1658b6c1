"""Pre-train the tiny SAM as a promptable segmenter on a scan folder's pre-training pool.

The stand-in for SAM's own (web-scale, class-agnostic) pre-training: the whole random-init tiny SAM is
trained on the ``pretrain`` split only (no train/val/test subject is ever seen), with random prompts on

* the lesion masks of the pool's positives, and
* generic structures derived from the image alone, without labels: the foreground (head / ultrasound fan)
  and the connected components of a 1-D k-means quantisation (k = 3 and 4) of the smoothed foreground
  (ventricles, white matter, skull, tissue layers, bright / dark blobs).

Prompts per target: a box jittered by ~``box_jitter`` of its side (SAM's noise) -> the single-mask
output; or 1-``max_points`` points inside (+ a negative point outside, sometimes) -> the three
multimask outputs for a single point (the best of the three is back-propagated, as SAM does for
ambiguous prompts), the single-mask output otherwise. Loss: BCE + Dice on the masks upsampled to the
image (``Sam.postprocess_masks``, the predictor's own path), + MSE of the IoU head to the true IoU.

The architecture is small enough for a CPU (default: 128-px input, patch 8 -> 16x16 grid, 4 blocks,
64 wide, a 128-wide decoder; the encoder's position embedding starts from MAE's 2-D sin-cos table
instead of zeros, which halves the steps before box prompts localise); it is saved as JSON next to the weights, so that
``negdpo.core.models.load_sam("tiny", checkpoint=<output_dir>/sam_pretrained.pth)`` rebuilds it.
Validation: box- and point-prompted Dice of lesions of held-out pool subjects, through
``negdpo.segmentation.sam_prompt.SamSegmenter`` (the inference path).

    negdpo pretrain-sam --output_dir outputs/sam_pretrain --data <phantoms with a pretrain split>

Scaffolding (Accelerate, output folder, metrics, checkpoints, resume) is ``negdpo.core.training``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from negdpo.core.config import check, check_positive
from negdpo.core.scans import SPLITS
from negdpo.core.training import TrainConfig
from negdpo.core.window import ScanReading

logger = logging.getLogger(__name__)
WEIGHTS = "sam_pretrained.pth"


@dataclass
class SamPretrainConfig(TrainConfig, ScanReading):
    """Promptable-segmentation pre-training of the tiny SAM on a scan folder's pre-training split."""

    run_name: str = "sam_pretrain"
    learning_rate: float = 1e-3
    adam_weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    train_batch_size: int = field(default=4, metadata={"help": "images per step"})
    max_train_steps: int = 700
    report_to: str = "none"
    logging_steps: int = 25
    # data
    data: str = field(default="", metadata={"help": "scan folder; empty = phantoms next to the output folder"})
    split: str = field(default="pretrain", metadata={"help": "the pre-training split (train/val/test are refused)"})
    phantoms_n: int = field(
        default=200, metadata={"help": "without data: phantom subjects of the train/val/test splits"})
    phantoms_size: int = field(default=128, metadata={"help": "without data: phantom image side in px"})
    phantoms_seed: int = field(default=0, metadata={"help": "without data: seed of the phantoms"})
    phantoms_pretrain_n: int = field(
        default=120, metadata={"help": "without data: phantom subjects of the disjoint pre-training pool"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the pool's subjects held out for val Dice"})
    # prompts and targets
    prompts_per_image: int = field(
        default=8, metadata={"help": "prompts (and targets) sampled per image and step"})
    lesion_share: float = field(default=0.7, metadata={"help": "chance that a prompt of a positive targets its lesion"})
    box_share: float = field(default=0.7, metadata={"help": "chance that an image's prompts are boxes (else points)"})
    box_jitter: float = field(default=0.1, metadata={"help": "box corner noise, std as a share of the box side"})
    max_points: int = field(
        default=3, metadata={"help": "point prompts: 1 to this many positive points inside the target"})
    negative_point_prob: float = field(
        default=0.3, metadata={"help": "point prompts: chance of one negative point outside the target"})
    min_structure_area: float = field(default=0.004, metadata={"help": "smallest generic target, share of the image"})
    max_structure_area: float = field(
        default=0.7, metadata={"help": "largest generic target, share of the image"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    # architecture (saved next to the weights)
    img_size: int = field(default=128, metadata={"help": "SAM input side in px"})
    patch_size: int = field(
        default=8, metadata={"help": "ViT patch side in px (img_size must be a multiple)"})
    encoder_embed_dim: int = field(default=64, metadata={"help": "image-encoder width"})
    encoder_depth: int = field(default=4, metadata={"help": "image-encoder blocks"})
    encoder_num_heads: int = field(default=4, metadata={"help": "image-encoder attention heads"})
    window_size: int = field(default=0, metadata={"help": "0 = global attention in every block"})
    prompt_embed_dim: int = field(default=128, metadata={"help": "prompt-encoder and mask-decoder width"})
    decoder_mlp_dim: int = field(default=512, metadata={"help": "mask-decoder MLP width"})
    decoder_num_heads: int = field(default=4, metadata={"help": "mask-decoder attention heads"})
    iou_head_hidden_dim: int = field(default=128, metadata={"help": "IoU-prediction head width"})
    # loss
    dice_weight: float = field(default=1.0, metadata={"help": "weight of the Dice term next to BCE"})
    iou_weight: float = field(default=1.0, metadata={"help": "weight of the IoU-prediction MSE term"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ScanReading.__post_init__(self)
        check_positive(self, "prompts_per_image", "max_points", "img_size", "patch_size", "encoder_embed_dim",
                       "encoder_depth", "encoder_num_heads", "prompt_embed_dim", "decoder_mlp_dim", "decoder_num_heads",
                       "iou_head_hidden_dim", "phantoms_n", "phantoms_size", "phantoms_pretrain_n")
        check(self.split not in SPLITS, "split", self.split,
              "must be the pre-training pool, not an evaluation split (no eval subject is seen in pre-training)")
        check(self.img_size % self.patch_size == 0, "img_size", self.img_size, "must be a multiple of patch_size")
        for key in ("val_fraction", "lesion_share", "box_share", "box_jitter", "negative_point_prob"):
            check(0.0 <= getattr(self, key) <= 1.0, key, getattr(self, key), "must be in [0, 1]")
        check(0 < self.min_structure_area < self.max_structure_area <= 1, "min_structure_area",
              self.min_structure_area, "must be in (0, max_structure_area)")

    def arch(self) -> dict[str, Any]:
        """The SAM architecture (``negdpo.core.models.sam.build_sam_arch`` keys)."""
        keys = ("img_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "window_size",
                "prompt_embed_dim", "decoder_mlp_dim", "decoder_num_heads", "iou_head_hidden_dim")
        return {**{k: getattr(self, k) for k in keys}, "encoder_global_attn_indexes": []}


# -- targets -------------------------------------------------------------------------------------
def _kmeans_levels(values: np.ndarray, k: int, iters: int = 20) -> np.ndarray:
    """Sorted 1-D k-means centres, started at quantiles (deterministic)."""
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        labels = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[labels == j].mean() if (labels == j).any() else centres[j] for j in range(k)])
    return np.sort(centres)


def structure_masks(image: np.ndarray, min_area: float = 0.004, max_area: float = 0.7) -> list[np.ndarray]:
    """Generic label-free targets of one grey image in [0, 1]: the foreground and the connected components of
    the k-means (k = 3, 4) intensity levels of the smoothed foreground, with an area in [min_area, max_area]
    of the image; near-duplicates (IoU > 0.85) dropped."""
    from scipy import ndimage

    img = np.asarray(image, np.float64)
    img = img.mean(-1) if img.ndim == 3 else img
    lo, hi = min_area * img.size, max_area * img.size
    smooth = ndimage.gaussian_filter(img, 2.0)
    near = ndimage.gaussian_filter(img, 1.0)
    fg = near > max(0.03, 0.5 * float(near.mean()))
    lab, n = ndimage.label(fg)
    out: list[np.ndarray] = []
    if n:
        fg = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(ndimage.sum(fg, lab, range(1, n + 1)))))
        out.append(fg)
        values = smooth[fg][::5]
        for k in (3, 4):
            centres = _kmeans_levels(values, k)
            level = np.abs(smooth[..., None] - centres).argmin(-1)
            for j in range(k):
                lab, _ = ndimage.label(ndimage.binary_opening(fg & (level == j)))
                for i, box in enumerate(ndimage.find_objects(lab), start=1):
                    if box is None or (lab[box] == i).sum() > hi:
                        continue
                    comp = np.zeros_like(fg)
                    comp[box] = ndimage.binary_fill_holes(lab[box] == i)
                    if comp.sum() >= lo:
                        out.append(comp)
    kept: list[np.ndarray] = []
    for m in out:
        area = m.sum()
        if not lo <= area <= hi:
            continue
        if all((m & k).sum() / (m | k).sum() <= 0.85 for k in kept):
            kept.append(m)
    return kept


@dataclass
class PoolImage:
    """One pool image: the RGB uint8 image, its resized copy (H', W', 3) for the encoder, and its targets."""

    name: str
    subject: str
    rgb: np.ndarray
    pixels: torch.Tensor
    hw: tuple[int, int]
    lesion: np.ndarray | None
    structures: list[np.ndarray]


def subject_of(name: str) -> str:
    """``mri_p0003_1.png`` -> ``mri_p0003`` (the slice suffix dropped)."""
    return Path(name).stem.rsplit("_", 1)[0]


def load_pool(data: Path, split: str, img_size: int, min_area: float, max_area: float,
              reading: dict | None = None) -> list[PoolImage]:
    from negdpo.core.imageio import to_rgb_uint8
    from negdpo.core.scans import ScanFolder
    from segment_anything.utils.transforms import ResizeLongestSide

    tf = ResizeLongestSide(img_size)
    out = []
    for s in ScanFolder(data, **(reading or {})).load_split(split):  # reading: ScanReading.reading()
        rgb = to_rgb_uint8(s.image)
        out.append(PoolImage(s.name, subject_of(s.name), rgb, torch.as_tensor(tf.apply_image(rgb)), rgb.shape[:2],
                             np.asarray(s.mask, bool) if s.positive else None,
                             structure_masks(rgb[..., 0] / 255.0, min_area, max_area)))
    return out


def split_pool(pool: list[PoolImage], val_fraction: float, seed: int) -> tuple[list[PoolImage], list[PoolImage]]:
    """(train, val) by subject: a seeded ``val_fraction`` of the pool's subjects is held out."""
    subjects = sorted({p.subject for p in pool})
    n_val = int(round(len(subjects) * val_fraction)) if len(subjects) > 1 else 0
    held = {subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))[:n_val]}
    return [p for p in pool if p.subject not in held], [p for p in pool if p.subject in held]


# -- prompts -------------------------------------------------------------------------------------
def jittered_box(mask: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """XYXY box of ``mask`` (the oracle box: ``postprocess.boxes_from_mask``) with each coordinate moved by
    N(0, (jitter x side)^2), at most 20 px (SAM), clipped to the image."""
    from .postprocess import boxes_from_mask

    h, w = mask.shape
    box = boxes_from_mask(mask, "union")[0].astype(np.float64)
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    noise = np.clip(rng.normal(0.0, 1.0, 4) * jitter * side, -20, 20)
    box = box + noise
    box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
    return np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])], np.float32)


def point_prompt(mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_pos`` (x, y) points inside ``mask`` and ``n_neg`` outside it within its box grown by half its size."""
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), n_pos, replace=len(xs) < n_pos)
    pts, lbl = [np.stack([xs[pick], ys[pick]], 1)], [np.ones(n_pos, np.int64)]
    if n_neg:
        h, w = mask.shape
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        dy, dx = (y1 - y0) // 2 + 2, (x1 - x0) // 2 + 2
        ring = np.zeros_like(mask)
        ring[max(0, y0 - dy):min(h, y1 + dy + 1), max(0, x0 - dx):min(w, x1 + dx + 1)] = True
        ring &= ~mask
        ny, nx = np.nonzero(ring if ring.any() else ~mask)
        if len(nx):
            pick = rng.choice(len(nx), n_neg, replace=len(nx) < n_neg)
            pts.append(np.stack([nx[pick], ny[pick]], 1))
            lbl.append(np.zeros(n_neg, np.int64))
    return np.concatenate(pts).astype(np.float32), np.concatenate(lbl)


def draw_prompts(img: PoolImage, cfg: SamPretrainConfig, rng: np.random.Generator, flip: bool) -> dict[str, Any]:
    """The step's prompts for one image: ``targets`` (K, H, W) bool, and ``boxes`` (K, 4) or ``points``
    (K, N, 2) + ``labels`` (K, N), in original pixel coordinates (after the flip)."""
    targets = []
    for _ in range(cfg.prompts_per_image):
        if img.lesion is not None and (not img.structures or rng.random() < cfg.lesion_share):
            m = img.lesion
        else:
            m = img.structures[int(rng.integers(len(img.structures)))]
        targets.append(m[:, ::-1] if flip else m)
    out: dict[str, Any] = {"targets": np.stack(targets)}
    if rng.random() < cfg.box_share:
        out["boxes"] = np.stack([jittered_box(m, cfg.box_jitter, rng) for m in targets])
    else:
        n_pos = int(rng.integers(1, cfg.max_points + 1))
        n_neg = int(rng.random() < cfg.negative_point_prob)
        pairs = [point_prompt(m, n_pos, n_neg, rng) for m in targets]
        out["points"], out["labels"] = np.stack([p for p, _ in pairs]), np.stack([lb for _, lb in pairs])
    return out


# -- loss ----------------------------------------------------------------------------------------
def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per mask (K, C): BCE + soft-Dice loss, and the IoU of the thresholded mask (logit > 0) with the target."""
    t = target[:, None].expand_as(logits).float()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-2, -1))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    hard = logits.detach() > 0
    inter, union = (hard & (t > 0)).sum((-2, -1)), (hard | (t > 0)).sum((-2, -1))
    return bce, dice, inter / union.clamp(min=1)


def image_loss(sam, embedding: torch.Tensor, prompts: dict[str, Any], img: PoolImage, cfg: SamPretrainConfig,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Decode one image's prompts and return the loss (best of three masks for single-point prompts)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    tf, dev = ResizeLongestSide(cfg.img_size), embedding.device
    boxes = points = None
    if "boxes" in prompts:
        boxes = torch.as_tensor(tf.apply_boxes(prompts["boxes"], img.hw), device=dev)
        multimask = False
    else:
        points = (torch.as_tensor(tf.apply_coords(prompts["points"], img.hw), device=dev),
                  torch.as_tensor(prompts["labels"], device=dev))
        multimask = prompts["labels"].shape[1] == 1
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    low, iou_pred = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask)
    input_hw = tuple(int(v) for v in img.pixels.shape[:2])
    logits = sam.postprocess_masks(low, input_hw, img.hw)
    target = torch.as_tensor(prompts["targets"].copy(), device=dev)
    bce, dice, iou = mask_losses(logits, target)
    per_mask = bce + cfg.dice_weight * dice
    best = per_mask.argmin(1)
    rows = torch.arange(len(best), device=dev)
    mask_loss = per_mask[rows, best].mean()
    iou_loss = F.mse_loss(iou_pred, iou)
    loss = mask_loss + cfg.iou_weight * iou_loss
    kind = "box" if boxes is not None else "point"
    return loss, {"mask_loss": float(mask_loss.detach()), "iou_loss": float(iou_loss.detach()),
                  f"{kind}_iou": float(iou[rows, best].mean())}


def init_pos_embed(sam) -> None:
    """Start the encoder's absolute position embedding (zeros in ``segment_anything``, learned) from the
    fixed 2-D sin-cos embedding of MAE: a random-init SAM then knows where each patch is from step 0."""
    pos = sam.image_encoder.pos_embed
    if pos is None:
        return
    _, gh, gw, dim = pos.shape
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    parts = [f(c[..., None] * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.zeros(gh, gw, dim, dtype=torch.float64)
    table[..., :4 * quarter] = torch.cat(parts, -1)
    with torch.no_grad():
        pos.copy_(table[None].to(pos.dtype))


def encode(sam, imgs: list[PoolImage], flips: list[bool]) -> torch.Tensor:
    """Image embeddings of a batch (flipped where asked), through ``Sam.preprocess`` (normalise, pad)."""
    dev = sam.pixel_mean.device
    x = [img.pixels.permute(2, 0, 1).to(dev, torch.float32) for img in imgs]
    x = [t.flip(-1) if f else t for t, f in zip(x, flips)]
    return sam.image_encoder(torch.stack([sam.preprocess(t) for t in x]))


@torch.no_grad()
def validate(sam, pool: list[PoolImage], max_images: int = 64) -> dict[str, float]:
    """Mean Dice on the lesions of ``pool`` through ``SamSegmenter``: the tight box (the study's oracle box)
    and 3 points inside."""
    from . import metrics as M
    from .sam_prompt import SamConfig, SamSegmenter

    was = sam.training
    sam.eval()
    box = SamSegmenter(sam, SamConfig(prompt="box", box_mode="union"))
    point = SamSegmenter(sam, SamConfig(prompt="point", num_points=3))
    rows: dict[str, list[float]] = {"box": [], "point": []}
    for img in [p for p in pool if p.lesion is not None][:max_images]:
        for key, seg in (("box", box), ("point", point)):
            seg.set_image(img.rgb)
            pred, _ = seg.segment(img.lesion, 0)
            rows[key].append(float(M.dice(pred, img.lesion)))
    sam.train(was)
    return {f"val_{k}_dice": float(np.mean(v)) if v else float("nan") for k, v in rows.items()}


# -- training ------------------------------------------------------------------------------------
def resolve_data(cfg: SamPretrainConfig, out: Path) -> Path:
    if cfg.data:
        return Path(cfg.data)
    from negdpo.core.phantoms import ensure_phantoms

    return ensure_phantoms(out.parent / f"phantoms_n{cfg.phantoms_n}_s{cfg.phantoms_size}_seed{cfg.phantoms_seed}"
                                        f"_pre{cfg.phantoms_pretrain_n}", n=cfg.phantoms_n, size=cfg.phantoms_size,
                           seed=cfg.phantoms_seed, slices=2, preview=False, pretrain_n=cfg.phantoms_pretrain_n,
                           lesion_area=(0.01, 0.15))


def pretrain_sam(cfg: SamPretrainConfig) -> dict[str, Any]:
    """Run the pre-training; returns (and writes to ``summary.json``) ``checkpoint`` (the ``.pth``, with its
    architecture JSON next to it), ``val_box_dice``, ``val_point_dice`` (before: ``*_before``), ``seconds``."""
    from negdpo.core.config import derive_seed
    from negdpo.core.models.sam import build_sam_arch, save_sam
    from negdpo.core.training import (
        MetricsLog,
        NonFiniteGuard,
        epoch_batches,
        finish_run,
        make_optimizer,
        make_scheduler,
        resume_step,
        save_checkpoint,
        start_run,
        step_seed,
        update,
    )

    t0 = time.time()
    if cfg.data and not Path(cfg.data).is_dir():  # inputs before the output folder is claimed
        raise FileNotFoundError(f"--data {cfg.data}: scan folder does not exist")
    run = start_run(cfg, kind="sam_pretrain")
    acc = run.accelerator
    try:
        with acc.main_process_first():
            data = resolve_data(cfg, run.out)
        pool = load_pool(data, cfg.split, cfg.img_size, cfg.min_structure_area, cfg.max_structure_area, cfg.reading())
        train, val = split_pool(pool, cfg.val_fraction, cfg.seed)
        train = [p for p in train if p.lesion is not None or p.structures]
        if not train:
            raise ValueError(f"{data}: no '{cfg.split}' image with a lesion or a generic structure to train on")
        logger.info("%d pool images (%d held out), %d lesions, %.1f generic structures per image", len(pool),
                    len(val), sum(p.lesion is not None for p in train),
                    float(np.mean([len(p.structures) for p in train])))
        torch.manual_seed(derive_seed("sam_init", base=cfg.seed))
        arch = cfg.arch()
        sam = build_sam_arch(arch)
        init_pos_embed(sam)
        sam = sam.to(acc.device)
        params = [p for p in sam.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        scheduler = make_scheduler(optimizer, cfg, acc.num_processes)
        model, optimizer, scheduler = acc.prepare(sam, optimizer, scheduler)
        base = acc.unwrap_model(model)
        start = resume_step(run, cfg)
        metrics = MetricsLog(run, start)
        before = validate(base, val) if start == 0 and val else {}
        guard = NonFiniteGuard(cfg.max_nonfinite_grad_steps)
        model.train()
        for step in range(start, cfg.max_train_steps):
            logs: dict[str, list[float]] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                flat = step * cfg.gradient_accumulation_steps + micro
                rng = np.random.default_rng(step_seed(cfg.seed, step, micro, acc.process_index))
                idx = epoch_batches(len(train), cfg.train_batch_size, flat, cfg.seed, acc.num_processes,
                                    acc.process_index)
                imgs = [train[i] for i in idx]
                flips = [bool(cfg.flip and rng.random() < 0.5) for _ in imgs]
                prompts = [draw_prompts(img, cfg, rng, f) for img, f in zip(imgs, flips)]
                with acc.accumulate(model):
                    emb = encode(base, imgs, flips)
                    losses = []
                    for i, img in enumerate(imgs):
                        loss_i, m = image_loss(base, emb[i:i + 1], prompts[i], img, cfg)
                        losses.append(loss_i)
                        for k, v in m.items():
                            logs.setdefault(k, []).append(v)
                    loss = torch.stack(losses).mean()
                    grad_norm = update(run, loss, params, optimizer, scheduler, guard, cfg, step)
                logs.setdefault("loss", []).append(float(loss.detach()))
                if grad_norm is not None:
                    logs.setdefault("grad_norm", []).append(grad_norm)
            done = step + 1
            if done % cfg.logging_steps == 0 or done == cfg.max_train_steps:
                row = {k: float(np.mean(v)) for k, v in logs.items()}
                row["lr"] = scheduler.get_last_lr()[0]
                if cfg.validation_steps and done % cfg.validation_steps == 0 and val:
                    row.update(validate(base, val))
                metrics.log(done, row)
            if cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
                save_checkpoint(run, done, cfg.checkpoints_total_limit)
        after = validate(base, val) if val else {"val_box_dice": float("nan"), "val_point_dice": float("nan")}
        ckpt = run.out / WEIGHTS
        summary: dict[str, Any] = {"checkpoint": str(ckpt.resolve()), **after,
                                   **{f"{k}_before": v for k, v in before.items()}, "steps": cfg.max_train_steps,
                                   "train_images": len(train), "val_images": len(val), "data": str(data),
                                   "arch": arch, "seconds": round(time.time() - t0, 1)}
        if acc.is_main_process:
            save_sam(base, arch, ckpt)
            metrics.log(cfg.max_train_steps, {k: v for k, v in after.items()}, to_trackers=False)
            (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        return summary
    finally:
        finish_run(run)


def _run(argv: list[str]) -> int:
    from negdpo.core.config import parse_config

    cfg = parse_config(SamPretrainConfig, argv)
    s = pretrain_sam(cfg)
    before = (f" (random init: box {s['val_box_dice_before']:.3f}, point {s['val_point_dice_before']:.3f})"
              if "val_box_dice_before" in s else "")
    print(f"done in {s['seconds']} s ({s['steps']} steps, {s['train_images']} pool images); held-out pool lesions: "
          f"box Dice {s['val_box_dice']:.3f}, point Dice {s['val_point_dice']:.3f}{before}")
    print(f"weights: {s['checkpoint']} (load_sam('tiny', checkpoint=...); --sam tiny --sam_checkpoint ...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from negdpo.core.console import run_main

    return run_main("negdpo pretrain-sam", _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
