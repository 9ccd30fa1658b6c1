"""DHN-NCE (independently computed paper + parity numbers, docs/method.md#dhn-nce) and CLIP-DPO properties."""

import math

import numpy as np
import pytest
import torch
from negdpo.preference.clip.losses import (
    clip_contrastive_loss,
    clip_dpo_loss,
    clip_dpo_pair_loss,
    dhn_nce_loss,
)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


V2 = t([[1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]])
T2 = t([[0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])


@pytest.mark.parametrize("kwargs,expected", [
    (dict(v=np.eye(2), mode="parity"), -3.0529610277865573),
    (dict(v=np.eye(2), mode="paper"), -3.3333333333333335),
    (dict(v=np.eye(2), mode="parity", temperature=1.0), -2.3862943611198904),
    (dict(mode="parity"), -1.8350990491820893),
    (dict(mode="paper"), 0.01999010559589472),
    (dict(mode="parity", alpha=1.0), 0.9731454804753094),
    (dict(mode="paper", alpha=1.0), 1.4582158563802268),
    (dict(mode="parity", batch_size=16), 2.1947069919024407),
    (dict(mode="paper", alpha=1.0, beta1=0.0, beta2=0.0), 1.428404944810978),
])
def test_dhn_nce_reference_numbers(kwargs, expected):
    v = kwargs.pop("v", None)
    img, txt = (t(v), t(v)) if v is not None else (V2, T2)
    assert dhn_nce_loss(img, txt, **kwargs).item() == pytest.approx(expected, abs=1e-12)


def test_dhn_nce_properties():
    # parity: depends on beta1 + beta2 only; both modes scale invariant; batch_size=1 degenerate values
    a = dhn_nce_loss(V2, T2, beta1=0.3, beta2=0.0, mode="parity")
    assert a.item() == pytest.approx(dhn_nce_loss(V2, T2, mode="parity").item(), abs=1e-12)
    for mode in ("paper", "parity"):
        assert dhn_nce_loss(3.7 * V2, T2, mode=mode).item() == pytest.approx(dhn_nce_loss(V2, T2, mode=mode).item())
    assert dhn_nce_loss(V2, T2, mode="parity", batch_size=1).item() == -math.inf
    assert dhn_nce_loss(V2, T2, mode="parity", batch_size=1, alpha=1.0).item() == 0.0
    rng = np.random.default_rng(0)
    v, tt = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    assert dhn_nce_loss(t(v), t(tt), mode="parity", batch_size=16).item() == pytest.approx(1.73786486085614, abs=1e-12)
    # paper, alpha=1, beta=0 = 2 x symmetric InfoNCE at scale 1/tau
    assert dhn_nce_loss(V2, T2, alpha=1.0, beta1=0, beta2=0).item() == pytest.approx(
        2 * clip_contrastive_loss(V2, T2, 1 / 0.6).item(), abs=1e-12)
    with pytest.raises(ValueError, match=r"^dhn_nce_loss: unknown mode 'nope' \(use 'paper' or 'parity'\)$"):
        dhn_nce_loss(V2, T2, mode="nope")


def test_dpo_at_reference_is_log2_and_other_types():
    s = torch.randn(6, dtype=torch.float64)
    r = torch.randn(6, dtype=torch.float64)
    loss, m = clip_dpo_loss(s, r, s.clone(), r.clone(), beta=0.1)
    assert loss.item() == math.log(2)
    assert m["rewards/accuracies"].item() == 0.0 and m["rewards/margins"].item() == 0.0
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert clip_dpo_loss(s, r, s, r, 0.1, "hinge")[0].item() == 1.0
    assert clip_dpo_loss(s, r, s, r, 2.0, "ipo")[0].item() == pytest.approx(1 / (4 * 2.0 ** 2))
    assert clip_dpo_loss(s, r, s, r, 0.1, "robust", label_smoothing=0.2)[0].item() == pytest.approx(math.log(2))


def test_dpo_swap_negates_margin():
    pc, pr, rc, rr = torch.randn(4, 8, dtype=torch.float64)
    _, m1 = clip_dpo_loss(pc, pr, rc, rr, beta=0.5)
    _, m2 = clip_dpo_loss(pr, pc, rr, rc, beta=0.5)
    assert m2["rewards/margins"].item() == pytest.approx(-m1["rewards/margins"].item())
    l1, _ = clip_dpo_loss(pc, pr, rc, rr, beta=0.5, reduce=False)
    l2, _ = clip_dpo_loss(pr, pc, rr, rc, beta=0.5, reduce=False)
    assert torch.allclose(torch.exp(-l1) + torch.exp(-l2), torch.ones_like(l1))  # sigma(z) + sigma(-z) = 1


def test_partition_function_cancels():
    """Softmax log-probs over a candidate set containing both images give the same h as raw similarities."""
    torch.manual_seed(0)
    kappa = 14.3
    pol = kappa * torch.randn(5, 7, dtype=torch.float64).tanh()  # s(x_k, y) for 7 candidates, 5 texts
    ref = kappa * torch.randn(5, 7, dtype=torch.float64).tanh()
    c, r = 0, 3
    lp, lr_ = pol.log_softmax(1), ref.log_softmax(1)
    a, _ = clip_dpo_loss(lp[:, c], lp[:, r], lr_[:, c], lr_[:, r], beta=0.2, reduce=False)
    b, _ = clip_dpo_loss(pol[:, c], pol[:, r], ref[:, c], ref[:, r], beta=0.2, reduce=False)
    assert torch.allclose(a, b, atol=1e-12)


def test_pair_loss_directions_against_hand_terms():
    """Each direction's margin is its own similarity difference (a t2i/i2t swap or a wrong pairing fails)."""
    sims = torch.tensor([[[5.0, 1.0], [2.0, 0.5]], [[3.0, -1.0], [4.0, 2.0]]], dtype=torch.float64)
    ref = torch.zeros_like(sims)
    loss, m = clip_dpo_pair_loss(sims, sims.clone(), beta=1.0)
    assert loss.item() == pytest.approx(math.log(2))
    _, m = clip_dpo_pair_loss(sims, ref, beta=0.5)
    t2i = 0.5 * torch.tensor([5.0 - 2.0, 3.0 - 4.0])  # s(x+, y+) - s(x-, y+)
    i2t = 0.5 * torch.tensor([5.0 - 1.0, 3.0 + 1.0, 0.5 - 2.0, 2.0 - 4.0])  # x+: y+ over y-; x-: y- over y+
    assert m["t2i/rewards/margins"].item() == pytest.approx(t2i.mean().item())
    assert m["i2t/rewards/margins"].item() == pytest.approx(i2t.mean().item())
    assert m["t2i/rewards/accuracies"].item() == 0.5 and m["i2t/rewards/accuracies"].item() == 0.5
    assert m["rewards/margins"].item() == pytest.approx((t2i.mean() + i2t.mean()).item() / 2)
    t2i_loss, _ = clip_dpo_pair_loss(sims, ref, 0.5, directions=("t2i",))
    i2t_loss, _ = clip_dpo_pair_loss(sims, ref, 0.5, directions=("i2t",))
    assert t2i_loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(t2i).mean().item())
    assert i2t_loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(i2t).mean().item())
    both, _ = clip_dpo_pair_loss(sims, ref, 0.5)
    assert both.item() == pytest.approx((t2i_loss.item() + i2t_loss.item()) / 2)


def test_dpo_reference_terms_are_detached():
    pc, pr, rc, rr = (x.clone().requires_grad_(True) for x in torch.randn(4, 5, dtype=torch.float64))
    for loss_type in ("sigmoid", "robust", "ipo", "hinge"):
        loss, _ = clip_dpo_loss(pc, pr, rc, rr, 0.7, loss_type, label_smoothing=0.1)
        gp, gr, grc, grr = torch.autograd.grad(loss, [pc, pr, rc, rr], allow_unused=True)
        assert grc is None and grr is None, loss_type
        assert gp is not None and gp.abs().sum() > 0


def test_dpo_loss_types_hand_values():
    pc, pr = t([2.0, 0.0]), t([1.0, 1.0])
    rc, rr = t([0.5, 0.0]), t([0.0, 0.0])
    h = t([0.5, -1.0])  # (2 - 1) - 0.5, (0 - 1) - 0
    beta, eps = 0.8, 0.1
    ls = torch.nn.functional.logsigmoid
    cases = {"sigmoid": -ls(beta * h) * (1 - eps) - ls(-beta * h) * eps,
             "robust": (-ls(beta * h) * (1 - eps) + ls(-beta * h) * eps) / (1 - 2 * eps),
             "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": torch.clamp(1 - beta * h, min=0)}
    for name, expect in cases.items():
        got, m = clip_dpo_loss(pc, pr, rc, rr, beta, name, label_smoothing=eps, reduce=False)
        assert torch.allclose(got, expect, atol=1e-12), name
    default, m = clip_dpo_loss(pc, pr, rc, rr, beta, reduce=False)  # no label smoothing by default
    assert torch.allclose(default, -ls(beta * h), atol=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(beta * 0.75)
    assert m["rewards/rejected"].item() == pytest.approx(beta * 1.0)
    assert m["rewards/margins"].item() == pytest.approx(beta * -0.25)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["preference/accuracy"].item() == 0.5 and m["preference/margin"].item() == pytest.approx(0.0)
    _, tie = clip_dpo_loss(t([1.0, 2.0]), t([1.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta)
    assert tie["preference/accuracy"].item() == 0.5 and tie["rewards/accuracies"].item() == 0.5  # ties count wrong
    with pytest.raises(ValueError, match=r"^clip_dpo_loss: unknown loss_type 'kto' \(sigmoid, robust, ipo, hinge\)$"):
        clip_dpo_loss(pc, pr, rc, rr, beta, "kto")


def _dhn_paper_reference(v, tt, ids, temperature, alpha, b1, b2):
    """Paper-mode DHN-NCE written with loops: negatives of i are the rows with another caption id."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    tt = tt / np.linalg.norm(tt, axis=1, keepdims=True)
    s = v @ tt.T / temperature
    total = 0.0
    for mat, beta in ((s, b1), (s.T, b2)):
        rows = []
        for i in range(len(ids)):
            neg = [j for j in range(len(ids)) if ids[j] != ids[i]]
            if not neg and alpha == 0:
                continue
            e = np.exp(beta * mat[i, neg])
            w = len(neg) * e / e.sum() if neg else []
            den = sum(wj * np.exp(mat[i, j]) for wj, j in zip(w, neg)) + alpha * np.exp(mat[i, i])
            rows.append(np.log(den) - mat[i, i])
        total += np.mean(rows) if rows else 0.0
    return total


def test_dhn_nce_dedups_repeated_captions():
    """Defect: repeated identical (healthy) captions were negatives of each other in DHN-NCE."""
    rng = np.random.default_rng(1)
    v, tt = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    ids = [0, 1, 0, 1, 2, 1]
    tt[[2]], tt[[3, 5]] = tt[0], tt[1]  # the same caption has the same text features
    plain = dhn_nce_loss(t(v), t(tt)).item()
    assert dhn_nce_loss(t(v), t(tt), text_ids=torch.arange(6)).item() == pytest.approx(plain, abs=1e-12)
    assert plain == pytest.approx(_dhn_paper_reference(v, tt, list(range(6)), 0.6, 0.0, 0.15, 0.15), abs=1e-10)
    for alpha, b1, b2 in ((0.0, 0.15, 0.15), (0.5, 0.3, 0.0)):
        got = dhn_nce_loss(t(v), t(tt), alpha=alpha, beta1=b1, beta2=b2, text_ids=torch.tensor(ids)).item()
        assert got == pytest.approx(_dhn_paper_reference(v, tt, ids, 0.6, alpha, b1, b2), abs=1e-10)
    # perfect features, each image on its caption: the de-duplicated loss has no duplicate floor
    e = torch.eye(3, dtype=torch.float64)[ids]
    tau = 0.6  # negatives have s = 0 (uniform weights), row i: log N_i - 1/tau with N_i = 4, 3 or 5
    expect = 2 * ((2 * math.log(4) + 3 * math.log(3) + math.log(5)) / 6 - 1 / tau)
    assert dhn_nce_loss(e, e, text_ids=torch.tensor(ids)).item() == pytest.approx(expect, abs=1e-12)
    assert dhn_nce_loss(e, e).item() > expect + 0.5
    # parity keeps the public behaviour: ids ignored
    assert dhn_nce_loss(e, e, mode="parity", text_ids=torch.tensor(ids)).item() == dhn_nce_loss(e, e, mode="parity").item()


def test_dhn_nce_rows_without_negatives():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    same = torch.zeros(4, dtype=torch.long)
    loss = dhn_nce_loss(x, x.detach(), text_ids=same)
    assert loss.item() == 0.0  # no contrast at all
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    loss = dhn_nce_loss(x, x.detach() + 1, alpha=0.5, text_ids=same)  # only the alpha-weighted positive
    assert loss.item() == pytest.approx(2 * math.log(0.5), abs=1e-12)
    ids = torch.tensor([0, 0, 1, 2])
    dhn_nce_loss(x, x.detach() + 0.1, text_ids=ids).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    one = dhn_nce_loss(x[:1], x[:1].detach())  # a batch of one has no negative either
    assert one.item() == 0.0
    e = torch.eye(3, dtype=torch.float64)  # orthogonal features: zero similarities stay finite
    assert dhn_nce_loss(e, e, text_ids=torch.zeros(3, dtype=torch.long)).item() == 0.0


def test_contrastive_dedup_captions():
    """Duplicate captions: plain InfoNCE has an unreachable floor; de-duplicated ids remove it."""
    g = torch.Generator().manual_seed(0)
    v, tt = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    plain = clip_contrastive_loss(v, tt, 3.0).item()
    assert clip_contrastive_loss(v, tt, 3.0, torch.arange(6)).item() == pytest.approx(plain, abs=1e-12)
    assert clip_contrastive_loss(v, tt, 3.0, torch.tensor([5, 3, 1, 0, 2, 4])).item() == pytest.approx(plain, abs=1e-12)
    ids = torch.tensor([0, 1, 0, 1, 2, 1])  # e.g. two healthy captions repeated
    e = torch.eye(3, dtype=torch.float64)[ids]  # perfect features: each image on its caption
    assert clip_contrastive_loss(e, e, 50.0).item() > math.log(2) / 2  # floor from the duplicates
    assert clip_contrastive_loss(e, e, 50.0, ids).item() == pytest.approx(0.0, abs=1e-12)
    x = v.clone().requires_grad_(True)
    clip_contrastive_loss(x, tt, 3.0, ids).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dhn_nce_computes_half_precision_features_in_float32():
    g = torch.Generator().manual_seed(2)
    v, tt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for mode in ("paper", "parity"):
        ref = dhn_nce_loss(v, tt, mode=mode)
        half = dhn_nce_loss(v.to(torch.bfloat16), tt.to(torch.bfloat16), mode=mode)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(dhn_nce_loss(v.to(torch.bfloat16).float(), tt.to(torch.bfloat16).float(),
                                                         mode=mode).item(), abs=1e-6)
        assert half.item() == pytest.approx(ref.item(), abs=0.05)
