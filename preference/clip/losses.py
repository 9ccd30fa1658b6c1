"""CLIP objectives: DHN-NCE (baseline, paper and parity modes), CLIP-DPO, retention InfoNCE.

Similarities are *scaled* cosines ``s = kappa * cos(f_img, f_txt)`` with ``kappa = exp(logit_scale)``
held fixed. Formulas: ``docs/method.md#clip-dpo``, ``#dhn-nce`` and ``#contrastive-retention``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

DpoLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


# ---------------------------------------------------------------------------------------------- DHN-NCE
def dhn_nce_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float = 0.6,
                 alpha: float = 0.0, beta1: float = 0.15, beta2: float = 0.15,
                 mode: Literal["paper", "parity"] = "paper", batch_size: int | None = None,
                 text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled hard-negative InfoNCE (MedCLIP-SAM's DHN-NCE) on a batch of matched features.

    ``mode="paper"``: L = mean_i l^{v->t}_i + mean_i l^{t->v}_i with hardness weights
    w_ij = N_i softmax_{j in neg(i)}(beta S_ij) over the N_i negatives of row i and the positive weighted by
    ``alpha`` in the denominator. ``text_ids`` (B,): rows with the same id carry the same caption (phantom
    batches repeat the healthy text); such rows are not negatives of each other in either direction (by
    default every j != i is a negative). A batch of a single caption (or a single row) has no negative at
    all: the loss is then the constant 2 log(alpha) (0 for ``alpha`` = 0).
    ``mode="parity"``: the public ``hnl.py`` behaviour, including its column-wise normaliser, beta only in
    the numerator, the mean over all B^2 entries and N = ``batch_size`` - 1 (``batch_size`` defaults to the
    actual batch; the public training script passed the configured batch size); ``text_ids`` is ignored
    (the public code treats repeated captions as negatives). Features are L2-normalised here; the
    model's logit scale is not used (fixed temperature).
    """
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    v = F.normalize(image_features.to(dtype), dim=-1)
    t = F.normalize(text_features.to(dtype), dim=-1)
    n = v.shape[0]
    sim = v @ t.T / temperature
    if mode == "paper":
        if text_ids is None:
            same = torch.eye(n, dtype=torch.bool, device=sim.device)
        else:
            ids = text_ids.to(sim.device)
            same = ids[:, None] == ids[None, :]
        if bool(same.all()):  # one caption (or one row): no negative, a constant without gradient
            return (0.0 * sim).sum() + (2.0 * math.log(alpha) if alpha > 0 else 0.0)
        return _dhn_direction(sim, alpha, beta1, same) + _dhn_direction(sim.T, alpha, beta2, same)
    if mode == "parity":
        big_n = (n if batch_size is None else batch_size) - 1
        return _dhn_parity(sim, alpha, beta1, beta2, big_n)
    raise ValueError(f"dhn_nce_loss: unknown mode {mode!r} (use 'paper' or 'parity')")


def _dhn_direction(sim: torch.Tensor, alpha: float, beta: float, same: torch.Tensor) -> torch.Tensor:
    """Mean paper-mode row loss; ``same`` (B, B) bool marks the pairs that are not negatives (diagonal included).

    Every row must have a negative (the caller handles a batch of one caption).
    """
    pos = sim.diagonal()
    n_neg = (~same).sum(dim=1)
    # log w_ij = log N_i + log_softmax_{j in neg(i)}(beta * S_ij); log of the weighted negative sum:
    log_w = torch.log(n_neg.to(sim.dtype))[:, None] + torch.log_softmax(
        (beta * sim).masked_fill(same, float("-inf")), dim=1)
    terms = [torch.logsumexp((sim + log_w).masked_fill(same, float("-inf")), dim=1)]
    if alpha > 0:
        terms.append(math.log(alpha) + pos)
    return (torch.logsumexp(torch.stack(terms), dim=0) - pos).mean()


def _dhn_parity(sim: torch.Tensor, alpha: float, beta1: float, beta2: float, big_n: int) -> torch.Tensor:
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)

    def side(s: torch.Tensor, beta: float) -> torch.Tensor:
        z = torch.exp(s.masked_fill(eye, 0.0)).sum(dim=1)  # Z_j, the masked diagonal contributes exp(0)
        diag = -s.diagonal() + torch.log(alpha * torch.exp(s.diagonal()) + big_n / z)
        off = torch.log(alpha + big_n * torch.exp((1 + beta) * s) / z[None, :])  # divides by Z of the column
        return torch.where(eye, torch.diag_embed(diag), off).sum()

    return (side(sim, beta1) + side(sim.T, beta2)) / (n * n)


# ---------------------------------------------------------------------------------------------- CLIP-DPO
def clip_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float, loss_type: DpoLossType = "sigmoid",
                  label_smoothing: float = 0.0, reduce: bool = True
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on per-pair scaled similarities (the partition function cancels, docs/method.md#clip-dpo).

    h = (s_c - s_r) - (s_ref_c - s_ref_r), the reference terms detached (no gradient reaches them).
    sigmoid: -log sigma(beta h) (label-smoothed / robust when ``label_smoothing`` > 0); ipo: (h - 1/(2 beta))^2
    (TRL's IPO, beta as the regulariser tau; 1/(4 beta^2) at h = 0); hinge: relu(1 - beta h). Returns
    (loss, metrics) with the mean loss (or per-pair losses with ``reduce=False``) and TRL metric names;
    ``rewards/accuracies`` uses the strict rule (ties count as wrong).
    """
    pi = policy_chosen - policy_rejected
    ref_chosen, ref_rejected = ref_chosen.detach().to(pi.dtype), ref_rejected.detach().to(pi.dtype)
    h = pi - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"clip_dpo_loss: unknown loss_type {loss_type!r} (sigmoid, robust, ipo, hinge)")
    chosen_r = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_r = (beta * (policy_rejected - ref_rejected)).detach()
    metrics = {
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
        "preference/accuracy": (pi.detach() > 0).float().mean(),  # policy prefers chosen (not vs ref)
        "preference/margin": pi.detach().mean(),
    }
    return (losses.mean() if reduce else losses), metrics


def pair_terms(sims: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(chosen, rejected) similarity pairs of the three preference terms from a (B, 2, 2) tensor.

    ``sims[b, i, j] = s(image_i, text_j)`` with index 0 = positive (lesion image / lesion text) and 1 =
    negative (healthy counterfactual / "no tumour" text). Terms: text->image for the lesion text
    (x+ over x-), image->text for x+ (y+ over y-) and for x- (y- over y+).
    """
    return {
        "t2i": (sims[:, 0, 0], sims[:, 1, 0]),
        "i2t_pos": (sims[:, 0, 0], sims[:, 0, 1]),
        "i2t_neg": (sims[:, 1, 1], sims[:, 1, 0]),
    }


def clip_dpo_pair_loss(policy_sims: torch.Tensor, ref_sims: torch.Tensor, beta: float,
                       loss_type: DpoLossType = "sigmoid", label_smoothing: float = 0.0,
                       directions: tuple[str, ...] = ("t2i", "i2t")
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean of the text->image and image->text CLIP-DPO losses on (B, 2, 2) similarity blocks."""
    pol, ref = pair_terms(policy_sims), pair_terms(ref_sims)
    groups = {"t2i": ["t2i"], "i2t": ["i2t_pos", "i2t_neg"]}
    total, metrics, acc = 0.0, {}, []
    for d in directions:
        names = groups[d]
        pc = torch.cat([pol[n][0] for n in names])
        pr = torch.cat([pol[n][1] for n in names])
        rc = torch.cat([ref[n][0] for n in names])
        rr = torch.cat([ref[n][1] for n in names])
        loss, m = clip_dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
        total = total + loss / len(directions)
        acc.append(m)
        metrics |= {f"{d}/{k}": v for k, v in m.items()}
    for k in acc[0]:
        metrics[k] = sum(m[k] for m in acc) / len(acc)
    return total, metrics


# ---------------------------------------------------------------------------------------------- retention
def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor | float, text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's ClipLoss, single process) for the retention / pre-training term.

    ``text_ids`` (N,): rows with the same id carry the same caption (phantom batches repeat the healthy
    text and many lesion prompts). Plain InfoNCE then treats identical captions as negatives of each
    other, a target no model can reach (the loss is bounded below by log of the duplicate count) whose
    gradient pushes same-caption images apart. With ids the captions are de-duplicated: image->text is
    a softmax over the distinct captions, text->image a soft target spread uniformly over the images of
    that caption (as a KL, so 0 is reachable), averaged over distinct captions. All ids distinct gives
    exactly the plain loss.
    """
    v = F.normalize(image_features, dim=-1)
    t = F.normalize(text_features, dim=-1)
    if text_ids is None:
        logits = logit_scale * v @ t.T
        labels = torch.arange(v.shape[0], device=v.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    uniq, inverse = torch.unique(text_ids, return_inverse=True)
    first = torch.full((uniq.numel(),), inverse.numel(), dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, torch.arange(inverse.numel(), device=inverse.device), "amin")
    logits = logit_scale * v @ t[first].T  # (N images, U distinct captions)
    i2t = F.cross_entropy(logits, inverse)
    member = F.one_hot(inverse, uniq.numel()).T.to(logits.dtype)  # (U, N)
    count = member.sum(1)
    t2i = -(member * logits.T.log_softmax(dim=1)).sum(1) / count - count.log()  # KL to the uniform target
    return (i2t + t2i.mean()) / 2
