"""Mask-aware two-stage objective on ViT patch tokens (docs/method.md#two-stage-ot).

Stage 1 (pairs of positives): entropic OT (POT ``ot.sinkhorn2``, differentiable through the torch
backend) between the two images' lesion patch tokens, plus a lesion-vs-background InfoNCE.
Stage 2 (positive / healthy counterfactual): the negative's tokens are all background.
``curriculum_weight`` moves the mix from stage 1 to stage 2 over training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sinkhorn_cost(x: torch.Tensor, y: torch.Tensor, reg: float = 0.05, num_iter: int = 100,
                  wx: torch.Tensor | None = None, wy: torch.Tensor | None = None) -> torch.Tensor:
    """Entropic OT cost between token sets x (n, d) and y (m, d) with cosine cost 1 - cos.

    Uniform weights unless given. Uses POT's log-domain Sinkhorn (stable at small ``reg``).
    """
    import ot  # POT pulls in scikit-learn (~2 s): import it only when the OT loss runs, not with every trainer

    cost = 1 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    a = torch.full((x.shape[0],), 1 / x.shape[0], dtype=cost.dtype, device=cost.device) if wx is None else wx
    b = torch.full((y.shape[0],), 1 / y.shape[0], dtype=cost.dtype, device=cost.device) if wy is None else wy
    return ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=1e-6)


def lesion_infonce(anchors: torch.Tensor, positive: torch.Tensor, background: torch.Tensor,
                   temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE: each lesion token (n, d) should match ``positive`` (d,) over all background tokens (m, d)."""
    a = F.normalize(anchors, dim=-1)
    pos = (a @ F.normalize(positive, dim=-1)) / temperature  # (n,)
    neg = a @ F.normalize(background, dim=-1).T / temperature  # (n, m)
    logits = torch.cat([pos[:, None], neg], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def _split(tokens: torch.Tensor, patch_mask: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    lesion = patch_mask >= threshold
    if not lesion.any():  # tiny lesion: keep the patch with the largest coverage
        lesion = patch_mask == patch_mask.max()
    return tokens[lesion], tokens[patch_mask <= 0]


def stage1_loss(tokens_a: torch.Tensor, mask_a: torch.Tensor, tokens_b: torch.Tensor, mask_b: torch.Tensor,
                reg: float = 0.05, temperature: float = 0.1, ot_weight: float = 1.0,
                threshold: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Two positives: OT between their lesion tokens + lesion-vs-background InfoNCE (both ways).

    tokens (P, d) patch tokens, masks (P,) lesion fraction per patch.
    """
    la, ba = _split(tokens_a, mask_a, threshold)
    lb, bb = _split(tokens_b, mask_b, threshold)
    ot_cost = sinkhorn_cost(la, lb, reg)
    bg = torch.cat([ba, bb])
    nce = (lesion_infonce(la, lb.mean(0), bg, temperature) + lesion_infonce(lb, la.mean(0), bg, temperature)) / 2
    return ot_weight * ot_cost + nce, {"stages/ot": float(ot_cost.detach()), "stages/nce1": float(nce.detach())}


def stage2_loss(tokens_pos: torch.Tensor, mask_pos: torch.Tensor, tokens_neg: torch.Tensor,
                temperature: float = 0.1, threshold: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Positive vs its healthy counterfactual: every token of the negative (and the positive's own
    background) is background for the positive's lesion tokens."""
    les, bg = _split(tokens_pos, mask_pos, threshold)
    nce = lesion_infonce(les, les.mean(0), torch.cat([tokens_neg, bg]), temperature)
    return nce, {"stages/nce2": float(nce.detach())}


def curriculum_weight(step: int, total: int, start: float = 0.3, end: float = 0.7) -> float:
    """Weight of stage 2: 0 before ``start``*total, 1 after ``end``*total, linear in between."""
    if total <= 0:
        return 1.0
    t = step / total
    if end <= start:
        return float(t >= start)
    return float(min(max((t - start) / (end - start), 0.0), 1.0))


def two_stage_loss(tokens_pos: torch.Tensor, masks: torch.Tensor, tokens_neg: torch.Tensor, stage2_weight: float,
                   reg: float = 0.05, temperature: float = 0.1, ot_weight: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Batch objective: (1 - w) * stage 1 over consecutive positive pairs (i, i+1 mod B) + w * stage 2.

    tokens_pos / tokens_neg (B, P, d); masks (B, P) lesion fractions.
    """
    b = tokens_pos.shape[0]
    total = tokens_pos.new_zeros(())
    logs: dict[str, float] = {}
    if stage2_weight < 1 and b > 1:
        s1 = []
        for i in range(b):
            j = (i + 1) % b
            loss, m = stage1_loss(tokens_pos[i], masks[i], tokens_pos[j], masks[j], reg, temperature, ot_weight)
            s1.append(loss)
            for k, v in m.items():
                logs[k] = logs.get(k, 0.0) + v / b
        total = total + (1 - stage2_weight) * torch.stack(s1).mean()
    if stage2_weight > 0 or b == 1:
        w2 = stage2_weight if b > 1 else 1.0
        s2 = []
        for i in range(b):
            loss, m = stage2_loss(tokens_pos[i], masks[i], tokens_neg[i], temperature)
            s2.append(loss)
            logs["stages/nce2"] = logs.get("stages/nce2", 0.0) + m["stages/nce2"] / b
        total = total + w2 * torch.stack(s2).mean()
    logs["stages/weight2"] = stage2_weight
    return total, logs
