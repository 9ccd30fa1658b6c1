"""CLIP preference-training step benchmark: samples/s and peak memory per objective.

    python benchmarks/clip_train.py                       # tiny preset on CPU (phantom pairs)
    python benchmarks/clip_train.py --biomedclip-size --device cuda --batch 64   # the biomedclip-random preset

Variants: DHN-NCE, CLIP-DPO with the reference forward on the fly, CLIP-DPO with cached reference
similarities, + attention entropy, + two-stage OT. One "sample" = one preference pair (2 images, 2 texts).
Writes ``benchmarks/results/clip_train_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from negdpo.preference.clip import model as cm  # noqa: E402
from negdpo.preference.clip.train import ClipTrainConfig, compute_loss  # noqa: E402

VARIANTS = {
    "dhn_nce": ("dhn_nce", False),
    "dpo_on_the_fly": ("dpo", False),
    "dpo_cached_ref": ("dpo", True),
    "dpo+entropy": ("dpo+entropy", True),
    "dpo+stages": ("dpo+stages", True),
}


def make_batch(b: int, context: int, vocab: int, grid: tuple[int, int], device) -> dict:
    g = torch.Generator().manual_seed(0)
    pm = torch.zeros(b, grid[0] * grid[1])
    pm[:, 40:60] = 1.0
    return {"pos": torch.randn(b, 3, 224, 224, generator=g).to(device),
            "neg": torch.randn(b, 3, 224, 224, generator=g).to(device),
            "texts": torch.randint(1, vocab, (2 * b, context), generator=g).to(device), "patch_mask": pm.to(device),
            "ref_sims": torch.zeros(b, 2, 2).to(device)}


def bench(model, batch: dict, loss: str, cached: bool, steps: int, warmup: int, device, amp: bool) -> dict:
    import psutil

    cfg = ClipTrainConfig(loss=loss, max_train_steps=steps + warmup)
    parts = cfg.parts()
    m = model.train()
    ref = None if cached or "dpo" not in parts else cm.CLIPReference(m, use_adapter_disable=False)
    if ref is not None and ref.copy is not None:
        ref.copy.to(device)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    b = {k: v for k, v in batch.items() if k != "ref_sims" or cached}
    scale = float(m.logit_scale.exp())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = psutil.Process().memory_info().rss
    peak_rss = rss0
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        kwargs = {"autocast": autocast} if autocast else {}
        loss_v, _ = compute_loss(cfg, parts, m, ref, b, scale, i, **kwargs)
        loss_v.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"samples_per_s": float(f"{steps * batch['pos'].shape[0] / dt:.4g}"), "step_s": round(dt / steps, 4)}
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_rss_mib"] = round(peak_rss / 2**20, 1)
    del ref, opt
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 8 tiny, 64 biomedclip-size)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--biomedclip-size", action="store_true", help="the biomedclip-random preset (BiomedCLIP's shapes)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    from negdpo.core.models import load_clip

    model, _, tok = load_clip("biomedclip-random" if a.biomedclip_size else "tiny")
    context, vocab = tok.context_length, tok.tokenizer.vocab_size
    batch_size = a.batch or (64 if a.biomedclip_size else 8)
    cm.disable_dropout(model)
    model.logit_scale.requires_grad_(False)
    model.to(device)
    batch = make_batch(batch_size, context, vocab, cm.grid_size(model), device)
    results = {}
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in a.variants.split(","):
        loss, cached = VARIANTS[name]
        model.load_state_dict(init_state)
        results[name] = bench(model, batch, loss, cached, a.steps, a.warmup, device, a.amp)
    base = results.get("dhn_nce", {}).get("samples_per_s")
    print(f"{'variant':<16} {'samples/s':>10} {'step s':>8} {'peak MiB':>9} {'vs DHN-NCE':>10}")
    for name, r in results.items():
        mem = r.get("peak_mem_mib", r.get("peak_rss_mib"))
        rel = f"{100 * r['samples_per_s'] / base:.0f}%" if base else "-"
        print(f"{name:<16} {r['samples_per_s']:>10.2f} {r['step_s']:>8.3f} {mem:>9.1f} {rel:>10}")
    report = {"device": str(device), "model": "biomedclip-random" if a.biomedclip_size else "tiny",
              "batch_pairs": batch_size, "steps": a.steps, "amp": a.amp, "threads": torch.get_num_threads(),
              "results": results}
    out = Path(a.out or Path(__file__).parent / "results" / f"clip_train_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
