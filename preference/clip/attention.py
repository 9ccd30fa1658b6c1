"""Scoped capture of ViT attention probabilities and the CLS->patch attention entropy.

``capture_attention(model, blocks)`` registers forward hooks on chosen timm ``Attention`` modules of an
open_clip ``TimmModel`` vision tower. The hook recomputes softmax(q k^T * scale) from the block's input
with the module's own ``qkv`` / ``q_norm`` / ``k_norm`` weights (differentiable), so the forward itself is
never altered: fused (SDPA) and eager paths give identical outputs, nothing is patched on the class or
the instance, and leaving the context removes the hooks. Costs one extra q/k projection per chosen block.

Formulas and sources: docs/method.md#attention-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def vision_trunk(model: nn.Module) -> nn.Module:
    """The timm ViT inside an open_clip model (CLIP, CustomTextCLIP, a PEFT wrapper, or the trunk itself)."""
    m = model
    for attr in ("base_model", "model"):  # PEFT: PeftModel.base_model (LoraModel).model
        while hasattr(m, attr) and isinstance(getattr(m, attr), nn.Module) and not hasattr(m, "visual"):
            m = getattr(m, attr)
    m = getattr(m, "visual", m)
    m = getattr(m, "trunk", m)
    if not hasattr(m, "blocks"):
        raise TypeError(f"{type(model).__name__}: expected an open_clip model with a timm ViT vision tower "
                        "(visual.trunk.blocks); attention capture supports timm ViTs only")
    return m


def _attn_probs(attn: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask
    return logits.softmax(dim=-1)


class AttentionRecord(dict):
    """{block index: (B, heads, N, N) probabilities} filled during forwards inside the context.

    ``num_prefix_tokens``: the tower's non-patch tokens (CLS + registers), read from the timm trunk; pass it to
    :func:`attention_entropy` / :func:`attention_mask_pull`.
    """

    num_prefix_tokens: int = 1

    def stacked(self) -> torch.Tensor:
        """(blocks, B, heads, N, N) in block order."""
        return torch.stack([self[k] for k in sorted(self)])


@contextmanager
def capture_attention(model: nn.Module, blocks: Sequence[int] = (-1,)) -> Iterator[AttentionRecord]:
    """Record attention probabilities of ``blocks`` (indices into the trunk's blocks, negatives allowed).

    The latest forward's probabilities are kept per block (keeping the autograd graph). Hooks are removed
    on exit, also on error.
    """
    trunk = vision_trunk(model)
    n_blocks = len(trunk.blocks)
    record = AttentionRecord()
    record.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
    handles = []
    try:
        for raw in blocks:
            idx = raw % n_blocks
            attn = trunk.blocks[idx].attn
            if not hasattr(attn, "qkv"):
                raise TypeError(f"block {idx}: {type(attn).__name__} has no fused qkv projection")

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, idx: int = idx) -> None:
                x = args[0] if args else kwargs["x"]
                mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
                record[idx] = _attn_probs(module, x, mask)

            handles.append(attn.register_forward_hook(hook, with_kwargs=True))
        yield record
    finally:
        for h in handles:
            h.remove()


def cls_patch_attention(probs: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """CLS->patch attention renormalised over patches: (..., heads, N, N) -> (..., heads, P).

    Token 0 is the CLS token and the first ``num_prefix_tokens`` tokens are not patches (timm layout; 1 for a
    ViT without registers such as BiomedCLIP; use ``AttentionRecord.num_prefix_tokens`` of the capture).
    """
    row = probs[..., 0, num_prefix_tokens:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def attention_entropy(probs: torch.Tensor, num_prefix_tokens: int = 1, normalized: bool = True) -> torch.Tensor:
    """Entropy of CLS->patch attention per image, averaged over heads (and leading block dims).

    ``probs``: (B, heads, N, N) or (blocks, B, heads, N, N). Divided by log(P) when ``normalized``
    (so uniform attention = 1). Returns (B,).
    """
    p = cls_patch_attention(probs, num_prefix_tokens)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)  # (..., B, heads)
    if normalized:
        ent = ent / math.log(p.shape[-1])
    ent = ent.mean(-1)
    return ent.reshape(-1, ent.shape[-1]).mean(0)


def mask_to_patches(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Lesion fraction per patch: (B, H, W) bool/float -> (B, gh*gw) in [0, 1] (area pooling)."""
    m = mask.float()[:, None]
    return F.adaptive_avg_pool2d(m, grid).flatten(1)


def attention_mask_pull(probs: torch.Tensor, patch_mask: torch.Tensor, num_prefix_tokens: int = 1,
                        eps: float = 1e-6) -> torch.Tensor:
    """Cross-entropy of CLS->patch attention against the lesion distribution, per image (B,).

    Images without lesion give 0. ``patch_mask``: (B, P) lesion fraction per patch.
    """
    p = cls_patch_attention(probs, num_prefix_tokens)  # (..., B, heads, P)
    total = patch_mask.sum(-1, keepdim=True)
    q = patch_mask / total.clamp_min(eps)
    ce = -(q[:, None] * torch.log(p.clamp_min(1e-12))).sum(-1).mean(-1)  # (..., B)
    ce = ce.reshape(-1, ce.shape[-1]).mean(0)
    return torch.where(total.squeeze(-1) > 0, ce, torch.zeros_like(ce))
