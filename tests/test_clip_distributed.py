"""Gathered negatives: two processes with ``gather_with_grad`` + DDP's gradient average = one process on the
whole batch (loss and gradients), for DHN-NCE and the retention term, duplicate captions included."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from negdpo.preference.clip.distributed import gather_ids, gather_with_grad
from negdpo.preference.clip.losses import clip_contrastive_loss, dhn_nce_loss

N, D = 8, 5


def _data():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(N, 6, generator=g), torch.randn(N, 6, generator=g)
    tokens = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [7, 8], [3, 4], [9, 9]])  # repeated captions
    torch.manual_seed(1)
    return x_img, x_txt, tokens, torch.nn.Linear(6, D), torch.nn.Linear(6, D)


def _loss(img, txt, ids):
    return dhn_nce_loss(img, txt, text_ids=ids) + clip_contrastive_loss(img, txt, 10.0, ids)


def _worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_img, x_txt, tokens, f_img, f_txt = _data()
        part = slice(rank * N // world, (rank + 1) * N // world)
        img, txt = gather_with_grad(f_img(x_img[part])), gather_with_grad(f_txt(x_txt[part]))
        loss = _loss(img, txt, gather_ids(tokens[part]))
        loss.backward()
        grads = [p.grad.clone() for p in (*f_img.parameters(), *f_txt.parameters())]
        for g in grads:  # what DDP does with the parameter gradients
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, path), nprocs=2, join=True)
    got = torch.load(path, weights_only=True)

    x_img, x_txt, tokens, f_img, f_txt = _data()
    loss = _loss(f_img(x_img), f_txt(x_txt), torch.unique(tokens, dim=0, return_inverse=True)[1])
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    for g, p in zip(got["grads"], (*f_img.parameters(), *f_txt.parameters())):
        torch.testing.assert_close(g, p.grad)


def test_one_process_passes_through():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_ids(torch.tensor([[1], [2], [1]])).tolist() == [0, 1, 0]
