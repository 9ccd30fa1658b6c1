"""Contrastive negatives from every process (open_clip's ``--gather-with-grad``).

With ``gather_with_grad`` each process computes the contrastive terms on the features of the whole global batch
(``_GatherWithGrad`` keeps the gradient path to every process's encoder). DDP then
averages the parameter gradients over processes, which makes the update the gradient of the global-batch loss —
the same as one process seeing the whole batch (tests/test_clip_distributed.py checks this with two processes).
Outside a process group (one process) the features pass through unchanged.

``_GatherWithGrad`` is the autograd rule of ``torch.distributed.nn.functional.all_gather`` written with the two
plain collectives: that function (deprecated in torch 2.14) left gloo work behind at process exit, and a third to a half of
two-process CPU test runs aborted after a correct result ("terminate called without an active exception"); with plain
``all_gather`` / ``all_reduce`` none of 40 did.
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
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: every process's (N, ...) block in rank order. Backward: the sum over processes of the gradient
    of each one's loss w.r.t. the gathered tensor, this process's block of it (the adjoint of the gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.block = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.block]


def gather_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Caption ids that are equal across processes exactly when the token rows are: (sum of N over ranks,)."""
    if world_size() > 1:
        import torch.distributed as dist

        parts = [torch.empty_like(tokens) for _ in range(world_size())]
        dist.all_gather(parts, tokens.contiguous())
        tokens = torch.cat(parts)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]
