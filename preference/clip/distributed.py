"""Contrastive negatives from every process (open_clip's ``--gather-with-grad``).

With ``gather_with_grad`` each process computes the contrastive terms on the features of the whole global batch
(``torch.distributed.nn.functional.all_gather`` keeps the gradient path to every process's encoder). DDP then
averages the parameter gradients over processes, which makes the update the gradient of the global-batch loss —
the same as one process seeing the whole batch (tests/test_clip_distributed.py checks this with two processes).
Outside a process group (one process) the features pass through unchanged.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) of every process in rank order, differentiably (identity for one process)."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Caption ids that are equal across processes exactly when the token rows are: (sum of N over ranks,)."""
    if world_size() > 1:
        import torch.distributed as dist

        parts = [torch.empty_like(tokens) for _ in range(world_size())]
        dist.all_gather(parts, tokens.contiguous())
        tokens = torch.cat(parts)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]
