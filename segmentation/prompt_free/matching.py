"""DETR / MaskSAM set prediction: Hungarian matching and the matched loss (docs/method.md#prompt-generator).

Per image, the cost of assigning query i to target j is

    C_ij = w_cls * (-p_i(c_j)) + w_l1 * |b_i - b_j|_1 + w_giou * (-GIoU(b_i, b_j))
           + w_bce * BCE(m_i, t_j) + w_dice * DiceLoss(m_i, t_j)

(boxes cx, cy, w, h in [0, 1]; GIoU through ``torchvision.ops``), solved with
``scipy.optimize.linear_sum_assignment``. The loss is cross-entropy over all queries (unmatched queries
target the "no object" class, whose weight is ``no_object_weight``) plus, over matched pairs and
normalised by the number of targets, L1 + (1 - GIoU) on boxes and BCE + Dice on masks (the final SAM
masks and, with weight ``aux_weight``, the generator's auxiliary masks, under the same assignment).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou


@dataclass
class LossWeights:
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    bce: float = 5.0
    dice: float = 5.0
    no_object_weight: float = 0.1
    aux_weight: float = 1.0


def pairwise_mask_costs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pixel BCE and Dice loss between every prediction (N, P) logits and target (T, P) in [0, 1]."""
    p = logits.shape[-1]
    pos, neg = F.softplus(-logits), F.softplus(logits)  # -log sigma(x), -log(1 - sigma(x))
    bce = (pos @ targets.T + neg @ (1 - targets).T) / p
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    return bce, dice


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pair soft Dice loss of matched (M, P) logits / targets."""
    prob = torch.sigmoid(logits)
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def giou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (T, 4) cx, cy, w, h -> (N, T) generalized IoU."""
    return generalized_box_iou(box_convert(a, "cxcywh", "xyxy"), box_convert(b, "cxcywh", "xyxy"))


@torch.no_grad()
def match_cost(logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, target: dict[str, torch.Tensor],
               w: LossWeights) -> torch.Tensor:
    """(N, T) assignment cost for one image: ``logits`` (N, K+1), ``boxes`` (N, 4), ``masks`` (N, ...) logits;
    ``target``: ``labels`` (T,), ``boxes`` (T, 4), ``masks`` (T, ...)."""
    prob = logits.float().softmax(-1)[:, target["labels"]]
    cost = -w.cls * prob
    cost = cost + w.l1 * torch.cdist(boxes.float(), target["boxes"].float(), p=1)
    cost = cost - w.giou * giou_pairs(boxes.float(), target["boxes"].float())
    bce, dice = pairwise_mask_costs(masks.float().flatten(1), target["masks"].float().flatten(1))
    return cost + w.bce * bce + w.dice * dice


def hungarian_match(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, target indices) of the minimum-cost assignment (each target gets one query)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return rows, cols


def set_loss(outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]], w: LossWeights,
             num_classes: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Matched loss over a batch: ``outputs`` hold ``logits`` (B, N, K+1), ``boxes`` (B, N, 4), ``masks`` and
    optionally ``aux_masks`` (B, N, H, W) logits; ``targets`` one dict per image (may have zero targets)."""
    bsz, n = outputs["logits"].shape[:2]
    device = outputs["logits"].device
    main = outputs.get("masks", outputs.get("aux_masks"))
    num_targets = max(sum(int(t["labels"].numel()) for t in targets), 1)
    class_target = torch.full((bsz, n), num_classes, dtype=torch.long, device=device)
    src_b, src_q, tgt_masks, tgt_boxes = [], [], [], []
    for b, t in enumerate(targets):
        if t["labels"].numel() == 0:
            continue
        rows, cols = hungarian_match(match_cost(outputs["logits"][b], outputs["boxes"][b], main[b], t, w))
        rows_t, cols_t = torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
        class_target[b, rows_t] = t["labels"][cols_t]
        src_b.append(torch.full_like(rows_t, b))
        src_q.append(rows_t)
        tgt_masks.append(t["masks"][cols_t])
        tgt_boxes.append(t["boxes"][cols_t])
    class_weight = torch.ones(num_classes + 1, device=device)
    class_weight[num_classes] = w.no_object_weight
    loss_cls = F.cross_entropy(outputs["logits"].float().flatten(0, 1), class_target.flatten(), class_weight)
    logs = {"loss/class": float(loss_cls.detach())}
    total = w.cls * loss_cls
    if src_b:
        bi, qi = torch.cat(src_b), torch.cat(src_q)
        tb, tm = torch.cat(tgt_boxes).float(), torch.cat(tgt_masks).float().flatten(1)
        pb = outputs["boxes"][bi, qi].float()
        loss_l1 = F.l1_loss(pb, tb, reduction="sum") / num_targets
        loss_giou = (1 - torch.diag(giou_pairs(pb, tb))).sum() / num_targets
        total = total + w.l1 * loss_l1 + w.giou * loss_giou
        logs |= {"loss/l1": float(loss_l1.detach()), "loss/giou": float(loss_giou.detach())}
        for key, weight, tag in (("masks", 1.0, "mask"), ("aux_masks", w.aux_weight, "aux")):
            if key not in outputs or weight == 0:
                continue
            pm = outputs[key][bi, qi].float().flatten(1)
            loss_bce = F.binary_cross_entropy_with_logits(pm, tm, reduction="none").mean(-1).sum() / num_targets
            loss_dice = dice_loss(pm, tm).sum() / num_targets
            total = total + weight * (w.bce * loss_bce + w.dice * loss_dice)
            logs |= {f"loss/{tag}_bce": float(loss_bce.detach()), f"loss/{tag}_dice": float(loss_dice.detach())}
    logs["loss"] = float(total.detach())
    return total, logs
