"""Side-by-side ratios, measured in one run on one machine: JSON + a markdown table.

    python benchmarks/run_all.py --device cpu                 # tiny presets (the tested run, ~1 min)
    nice python benchmarks/run_all.py --real --device cpu     # real architectures on CPU (small sizes, see below)
    python benchmarks/run_all.py --real --device cuda         # real architectures on a GPU -> results/<gpu-name>.json

Comparisons (A vs B, ratio = A / B for speed, A / B for memory):
  dpo_step    Diffusion-DPO step: LoRA + adapter-disabled reference vs the public structure (full fine-tune
              + a second frozen UNet as reference): pairs/s and peak memory
  m2ib        M2IB saliency batched vs one image at a time (the public implementation's loop): images/s
  clip_step   CLIP-DPO with the cached reference vs DHN-NCE: samples/s
  generation  negative generation with CFG: img/s, share of time outside the UNet, per speed option
  zero_shot   the zero-shot chain (M2IB -> post-processing -> SAM ViT-H): images/s
Real architectures = the ``sd15-inpaint-random``, ``biomedclip-random``, ``sam-vit-h-random`` presets
(random weights: speed and memory only). On CPU each variant runs in its own process so peak resident
memory is the variant's own; on CUDA peak memory is ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_module(name: str):
    """``benchmarks/<name>.py`` by path (names like ``evaluate`` / ``gen_train`` exist elsewhere too)."""
    import importlib.util

    key = f"negdpo_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]

# Sizes per mode: tiny (CPU test), real on CPU (what 2 cores finish), real on GPU (the intended scale).
SETTINGS = {
    "tiny": dict(dpo=dict(batch=1, resolution=None, steps=2, warmup=1, dtype="float32"),
                 m2ib=dict(images=2, batch=2, size=64), clip=dict(batch=2, steps=2, warmup=1),
                 gen=dict(size=64, steps=3, images=1, variants="baseline,no_sdpa,channels_last,bf16,xformers"),
                 chain=dict(images=1, batch=1, size=64)),
    # CPU: the full fine-tune's AdamW state (+6.9 GB) does not fit next to 2 UNets + grads in 24 GB; SGD (no
    # state) gives a lower bound on its step time and memory
    "cpu": dict(dpo=dict(batch=1, resolution=256, steps=1, warmup=1, dtype="float32", min_free_gib=14,
                         full_optimizer="sgd"),
                m2ib=dict(images=2, batch=2, size=256, options={"steps": 3, "samples": 4}),
                clip=dict(batch=2, steps=1, warmup=1),
                gen=dict(size=512, steps=2, images=1, variants="baseline,no_sdpa,channels_last,bf16,xformers"),
                chain=dict(images=1, batch=1, size=256, options={"steps": 3, "samples": 4})),
    "cuda": dict(dpo=dict(batch=4, resolution=512, steps=10, warmup=3, dtype="bfloat16"),
                 m2ib=dict(images=32, batch=16, size=256), clip=dict(batch=64, steps=10, warmup=3),
                 gen=dict(size=512, steps=20, images=4,
                          variants="baseline,no_sdpa,channels_last,bf16,compile,xformers"),
                 chain=dict(images=32, batch=16, size=256)),
}


def _dpo(real: bool, device: str, s: dict, full: bool) -> dict:
    import torch

    if full and real and device == "cpu":  # 2 UNets + grads + AdamW states: ~5 x 3.4 GB in fp32
        import psutil

        free = psutil.virtual_memory().available / 2**30
        with open("/proc/self/oom_score_adj", "w") as f:  # on a shared machine, this process goes first
            f.write("1000")
        if free < s.get("min_free_gib", 20):
            raise MemoryError(f"full fine-tune + 2nd UNet needs ~{s.get('min_free_gib', 20)} GiB; {free:.1f} GiB "
                              "available: not run")
    dtype = getattr(torch, s["dtype"])
    return bench_module("gen_train").bench(real, s["batch"], dtype, False, "model" if full else "disable_adapters",
                                           s["steps"], s["warmup"], device, full_ft=full, resolution=s["resolution"],
                                           optimizer=s.get("full_optimizer", "adamw") if full else "adamw")


def _m2ib(real: bool, device: str, s: dict) -> dict:
    return bench_module("evaluate").measure("biomedclip-random" if real else "tiny", "tiny", device, s["images"],
                                            s["batch"], s["size"], parts=("m2ib",), options=s.get("options"))


def _clip(real: bool, device: str, s: dict, variants: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        rep = bench_module("clip_train").main(["--device", device, "--batch", str(s["batch"]), "--steps", str(s["steps"]),
                               "--warmup", str(s["warmup"]), "--variants", variants, "--out", f"{d}/c.json"]
                              + (["--biomedclip-size"] if real else []))
    return rep["results"]


def _gen(real: bool, device: str, s: dict, variant: str) -> dict:
    return bench_module("generation").measure("sd15-inpaint-random" if real else "tiny", variant, device, s["size"], s["steps"], 7.5,
                   s["images"])


def _chain(real: bool, device: str, s: dict) -> dict:
    return bench_module("evaluate").measure("biomedclip-random" if real else "tiny",
                                            "sam-vit-h-random" if real else "tiny", device, s["images"],
                                            s["batch"], s["size"], parts=("chain",), options=s.get("options"))


FUNCS = {"dpo": _dpo, "m2ib": _m2ib, "clip": _clip, "gen": _gen, "chain": _chain}


def _child(fn: str, args: tuple, threads: int, queue) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        out = {"ok": True, "result": FUNCS[fn](*args)}
    except Exception as err:
        out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    out["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # the process's CPU seconds (all threads)
    queue.put(out)


def call(fn: str, args: tuple, isolate: bool, threads: int) -> dict:
    """Run one measurement (in a fresh process when ``isolate``: its own peak RSS)."""
    t0 = time.perf_counter()
    if not isolate:
        try:
            out = {"ok": True, "result": FUNCS[fn](*args)}
        except Exception as err:
            out = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]}
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(fn, args, threads, queue))
        proc.start()
        proc.join()
        out = queue.get() if not queue.empty() else {"ok": False, "error": f"exit code {proc.exitcode}"}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(real: bool, device: str, sections: list[str], isolate: bool, threads: int, settings: dict,
        log=print) -> dict:
    s = settings
    rep: dict = {}
    if "dpo_step" in sections:
        lora = call("dpo", (real, device, s["dpo"], False), isolate, threads)
        full = call("dpo", (real, device, s["dpo"], True), isolate, threads)
        mem = "peak_mem_gib" if device.startswith("cuda") or not isolate else "peak_rss_gib"

        def peak(r: dict) -> float | None:
            return r.get("peak_rss_gib") if mem == "peak_rss_gib" else r.get("result", {}).get("peak_mem_gib")

        lr, fr = lora.get("result", {}), full.get("result", {})
        rep["dpo_step"] = {"lora_disable_adapters": lora, "full_ft_second_unet": full, "memory_measure": mem,
                           "speedup_pairs_per_s": _ratio(fr.get("s_per_step"), lr.get("s_per_step")),  # same batch
                           "memory_ratio": _ratio(peak(lora), peak(full))}
        log(f"dpo_step: {rep['dpo_step']['speedup_pairs_per_s']}x pairs/s, memory x{rep['dpo_step']['memory_ratio']}")
    if "m2ib" in sections:
        r = call("m2ib", (real, device, s["m2ib"]), isolate, threads)
        res = r.get("result", {})
        batched = next((v for k, v in res.items() if k.startswith("m2ib_batched")), None)
        rep["m2ib"] = {**r, "settings": s["m2ib"], "speedup_batched": _ratio(batched, res.get("m2ib_one_at_a_time"))}
        log(f"m2ib: batched x{rep['m2ib']['speedup_batched']}")
    if "clip_step" in sections:
        r = call("clip", (real, device, s["clip"], "dhn_nce,dpo_cached_ref,dpo_on_the_fly"), isolate, threads)
        res = r.get("result", {})
        # speed ratio from the step times (samples/s is rounded): same batch size for both objectives
        rep["clip_step"] = {**r, "dpo_cached_vs_dhn_nce": _ratio(res.get("dhn_nce", {}).get("step_s"),
                                                                  res.get("dpo_cached_ref", {}).get("step_s"))}
        log(f"clip_step: cached CLIP-DPO / DHN-NCE x{rep['clip_step']['dpo_cached_vs_dhn_nce']}")
    if "generation" in sections:
        rows = {v: call("gen", (real, device, s["gen"], v), isolate, threads) for v in s["gen"]["variants"].split(",")}
        base = rows.get("baseline", {}).get("result", {}).get("img_per_s")
        for r in rows.values():
            r["vs_baseline"] = _ratio(r.get("result", {}).get("img_per_s"), base)
        rep["generation"] = rows
        log("generation: " + ", ".join(f"{k} x{v['vs_baseline']}" for k, v in rows.items()))
    if "zero_shot" in sections:
        rep["zero_shot"] = {**call("chain", (real, device, s["chain"]), isolate, threads),
                            "sam": "sam-vit-h-random" if real else "tiny", "settings": s["chain"]}
        log(f"zero_shot: {rep['zero_shot'].get('result')}")
    return rep


def table(rep: dict) -> str:
    """Markdown rows: comparison | A | B | ratio."""
    def g(d: dict, *keys, default="-"):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d

    lines = ["| comparison | A | B | A / B |", "|---|---|---|---|"]
    if "dpo_step" in rep:
        d = rep["dpo_step"]
        opt = g(d, "full_ft_second_unet", "result", "optimizer", default="adamw")
        lines.append(f"| DPO step pairs/s: LoRA + adapter-off ref (A) vs full FT ({opt}) + 2nd UNet (B) | "
                     f"{g(d, 'lora_disable_adapters', 'result', 'pairs_per_s')} | "
                     f"{g(d, 'full_ft_second_unet', 'result', 'pairs_per_s')} | {d['speedup_pairs_per_s']} |")
        mk = d["memory_measure"]
        pa = g(d, "lora_disable_adapters", mk) if mk == "peak_rss_gib" else g(d, "lora_disable_adapters", "result", mk)
        pb = g(d, "full_ft_second_unet", mk) if mk == "peak_rss_gib" else g(d, "full_ft_second_unet", "result", mk)
        lines.append(f"| DPO step peak memory GiB ({mk}) | {pa} | {pb} | {d['memory_ratio']} |")
    if "m2ib" in rep:
        res = rep["m2ib"].get("result", {})
        batched = next((v for k, v in res.items() if k.startswith("m2ib_batched")), "-")
        lines.append(f"| M2IB img/s: batched (A) vs one at a time (B) | {batched} | "
                     f"{res.get('m2ib_one_at_a_time', '-')} | {rep['m2ib']['speedup_batched']} |")
    if "clip_step" in rep:
        res = rep["clip_step"].get("result", {})
        lines.append(f"| CLIP step samples/s: CLIP-DPO cached ref (A) vs DHN-NCE (B) | "
                     f"{g(res, 'dpo_cached_ref', 'samples_per_s')} | {g(res, 'dhn_nce', 'samples_per_s')} | "
                     f"{rep['clip_step']['dpo_cached_vs_dhn_nce']} |")
    for v, r in rep.get("generation", {}).items():
        res = r.get("result", {})
        what = res.get("skipped") or (f"{res.get('img_per_s')} img/s, {res.get('outside_unet_share')} outside UNet"
                                      if r.get("ok") else r.get("error", "")[:80])
        size, steps = g(rep["generation"], "baseline", "result", "size"), g(rep["generation"], "baseline", "result", "steps")
        lines.append(f"| generation {size} px, {steps} steps CFG: {v} (A) vs baseline (B) | "
                     f"{what} | {g(rep['generation'], 'baseline', 'result', 'img_per_s')} | {r['vs_baseline']} |")
    if "zero_shot" in rep:
        lines.append(f"| zero-shot chain img/s (M2IB -> post -> SAM {rep['zero_shot']['sam']}) | "
                     f"{g(rep['zero_shot'], 'result', 'whole_chain')} | - | - |")
    return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real architectures (presets) instead of tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", default="dpo_step,m2ib,clip_step,generation,zero_shot")
    p.add_argument("--gen-variants", default=None, help="comma list of generation options (default per mode)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0 = leave)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>.json)")
    p.add_argument("--append", action="store_true", help="keep the other sections of an existing --out JSON")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    mode = "tiny" if not a.real else ("cuda" if a.device.startswith("cuda") else "cpu")
    settings = json.loads(json.dumps(SETTINGS[mode]))
    if a.gen_variants:
        settings["gen"]["variants"] = a.gen_variants
    isolate = a.real and not a.device.startswith("cuda")
    t0, load0 = time.perf_counter(), os.getloadavg()
    rep = run(a.real, a.device, a.sections.split(","), isolate, a.threads, settings)
    name = machine(a.device)
    env = {"machine": name, "device": a.device, "mode": mode, "real": a.real, "torch": torch.__version__,
           "settings": settings, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
           "wall_s": round(time.perf_counter() - t0, 1)}
    slug = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_") if a.device.startswith("cuda") \
        else f"cpu_{'real' if a.real else 'tiny'}"
    out = Path(a.out or BENCH / "results" / f"{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.append and out.is_file():
        old = json.loads(out.read_text())
        rep = {**old["results"], **rep}
        env = {**env, "earlier_runs": old["env"].get("earlier_runs", []) + [old["env"]]}
    md = table(rep)
    out.write_text(json.dumps({"env": env, "results": rep, "table": md}, indent=1))
    print(f"\n{name}, {mode}\n{md}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
