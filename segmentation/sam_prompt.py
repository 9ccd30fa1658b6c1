"""Coarse mask -> SAM prompts -> final mask, through ``segment_anything.SamPredictor``.

The image is embedded once (``set_image``); any number of coarse masks (checkpoints, the control
prompt) are then prompted against that embedding, all prompts of one mask in one ``predict_torch``.

Prompts: ``box`` (one union box, or one per component with ``box_mode="per_component"``), ``point``
(``num_points`` positive pixels of the coarse mask + ``num_negative`` background pixels, seeded, one
prompt), ``both`` (the point set attached to every box). ``multimask``: SAM returns 3 masks per prompt;
``multimask_select="best"`` keeps the one with the highest predicted IoU, ``"union"`` their union
(the public code's box-mode AVERAGE voting reduces to the union). Masks of several prompts are
united. Then, as in the public code, the K-largest-component filter with K = the number of external
contours of the coarse mask. An empty coarse mask gives an empty prediction (no SAM call) and is
flagged ``empty_coarse``; the public code crashes there.

Formulas and sources: docs/method.md#sam-prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .postprocess import boxes_from_mask, keep_largest, num_contours, sample_points


@dataclass
class SamConfig:
    prompt: Literal["box", "point", "both"] = "box"
    box_mode: Literal["union", "per_component"] = "union"
    num_points: int = 10
    num_negative: int = 0
    multimask: bool = False
    multimask_select: Literal["best", "union"] = "best"
    final_filter: bool = True
    ties: Literal["exact", "parity"] = "exact"


class SamSegmenter:
    """Wraps a ``Sam`` model; ``set_image`` once, then ``segment`` per coarse mask."""

    def __init__(self, sam, cfg: SamConfig | None = None) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        self.cfg = cfg or SamConfig()
        if self.cfg.prompt not in ("box", "point", "both"):
            raise ValueError(f"unknown SAM prompt '{self.cfg.prompt}' (use box, point or both)")
        self._hw: tuple[int, int] | None = None

    def set_image(self, image_rgb: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB."""
        self.predictor.set_image(np.ascontiguousarray(image_rgb), image_format="RGB")
        self._hw = image_rgb.shape[:2]

    def prompts(self, coarse: np.ndarray, seed: int) -> dict[str, np.ndarray | None]:
        """The prompt arrays (pixel coordinates) for one coarse mask."""
        cfg = self.cfg
        boxes = boxes_from_mask(coarse, cfg.box_mode) if cfg.prompt in ("box", "both") else None
        points = labels = None
        if cfg.prompt in ("point", "both"):
            points, labels = sample_points(coarse, cfg.num_points, np.random.default_rng(seed), cfg.num_negative)
        return {"boxes": boxes, "points": points, "labels": labels}

    @torch.no_grad()
    def segment(self, coarse: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
        """Final boolean mask (H, W) and info (``empty_coarse``, ``n_prompts``)."""
        if self._hw is None:
            raise RuntimeError("call set_image before segment")
        coarse = np.asarray(coarse, bool)
        if coarse.shape != self._hw:
            raise ValueError(f"coarse mask {coarse.shape} does not match the image {self._hw}")
        if not coarse.any():
            return np.zeros(self._hw, bool), {"empty_coarse": True, "n_prompts": 0}
        p = self.prompts(coarse, seed)
        pred, dev, tf = self.predictor, self.predictor.device, self.predictor.transform
        box_t = pts_t = lbl_t = None
        n = 1
        if p["boxes"] is not None:
            box_t = tf.apply_boxes_torch(torch.as_tensor(p["boxes"], device=dev), self._hw)
            n = box_t.shape[0]
        if p["points"] is not None:
            pts_t = tf.apply_coords_torch(torch.as_tensor(p["points"], device=dev), self._hw)[None].expand(n, -1, -1)
            lbl_t = torch.as_tensor(p["labels"], device=dev)[None].expand(n, -1)
        masks, scores, _ = pred.predict_torch(pts_t, lbl_t, boxes=box_t, multimask_output=self.cfg.multimask)
        masks = masks.bool()  # (N, C, H, W)
        if masks.shape[1] > 1:
            if self.cfg.multimask_select == "best":
                masks = masks[torch.arange(masks.shape[0]), scores.argmax(1)][:, None]
            else:
                masks = masks.any(1, keepdim=True)
        out = masks.any(dim=(0, 1)).cpu().numpy()
        if self.cfg.final_filter:
            out = keep_largest(out, max(num_contours(coarse), 1), self.cfg.ties)
        return out, {"empty_coarse": False, "n_prompts": int(masks.shape[0])}
