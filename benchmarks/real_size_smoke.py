"""The whole chain at real architecture size on CPU, one command: wall time and peak memory per stage.

    nice python benchmarks/real_size_smoke.py                 # ~10-30 min on 2 CPU cores, ~10 GB RAM
    python benchmarks/real_size_smoke.py --device cuda        # the same on a GPU

Stages (each in its own process, so the peak resident memory is the stage's own):
  presets     write ``sd15-inpaint-random``, ``biomedclip-random``, ``sam-vit-b-random`` (once) + phantoms
  gen_dpo     ``negdpo.generator.train``: Diffusion-DPO with LoRA, adapter-disabled reference, 256 px, batch 1
  build_pair  ``negdpo.preference.pairs``: one scan -> K=2 candidates with 2 sampling steps -> judged pair
  clip_dpo    ``negdpo.preference.clip.train``: CLIP-DPO on BiomedCLIP's architecture, batch 2
  zero_shot   ``negdpo.segmentation.evaluate``: one image through M2IB -> post-processing -> SAM ViT-B
Random weights (the presets): this checks that the real shapes run through the real code and what they
cost, not what they learn. Writes ``benchmarks/results/real_size_smoke_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 256  # px for every generator stage


def _setup(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


def _scalars(d: dict) -> dict:
    """The summary's top-level numbers and short strings (what fits a results table)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 120)}


def stage_presets(work: Path, device: str) -> dict:
    from negdpo.core.models import resolve_clip, resolve_diffusion, resolve_sam
    from negdpo.core.phantoms import ensure_phantoms

    out = {"diffusion": resolve_diffusion("sd15-inpaint-random"), "clip": resolve_clip("biomedclip-random"),
           "sam": str(resolve_sam("sam-vit-b-random")[1])}
    ensure_phantoms(work / "phantoms", n=6, size=SIZE, seed=0)
    return out


def stage_gen_dpo(work: Path, device: str) -> dict:
    from negdpo.generator.train import GenTrainConfig, train

    cfg = GenTrainConfig(
        pretrained_model_name_or_path="sd15-inpaint-random", dataset_name=str(work / "phantoms"), resolution=SIZE,
        output_dir=str(work / "gen"), overwrite_output_dir=True, train_batch_size=1, max_train_steps=2,
        learning_rate=1e-4, rank=8, reference="disable_adapters", sdpo=False, cache_latents=False,
        num_validation_images=0, eval_pairs=0, checkpointing_steps=0, report_to="none", mixed_precision="no",
        hflip_prob=0.0)
    return _scalars(train(cfg))


def stage_build_pair(work: Path, device: str) -> dict:
    from negdpo.preference.pairs.build import run_build
    from negdpo.preference.pairs.config import BuildConfig

    cfg = BuildConfig(data=str(work / "phantoms"), out=str(work / "pairs"), generator="sd15-inpaint-random", k=2,
                      steps=2, size=SIZE, clip="biomedclip-random", kinds="generator", splits="train", limit=2,
                      chunk_size=2, device=device, progress=False)
    summary = run_build(cfg, report=False, overwrite_output_dir=True)
    return {**_scalars(summary), "rows": summary.get("rows"), "failed": summary.get("failed"),
            "seconds": summary.get("seconds")}


def stage_clip_dpo(work: Path, device: str) -> dict:
    from negdpo.preference.clip.train import ClipTrainConfig, train

    cfg = ClipTrainConfig(pretrained_model_name_or_path="biomedclip-random", dataset_name=str(work / "phantoms"),
                          output_dir=str(work / "clip"), overwrite_output_dir=True, loss="dpo", val_split="test",
                          train_batch_size=2, eval_batch_size=2, max_train_steps=2, tsne=False,
                          save_final=False, report_to="none", progress_bar=False, logging_steps=1)
    return _scalars(train(cfg))


def stage_zero_shot(work: Path, device: str) -> dict:
    from negdpo.segmentation.evaluate import evaluate

    res = evaluate(work / "phantoms", {"biomedclip-random": "biomedclip-random"}, work / "eval", sam="sam-vit-b-random",
                   split="test", limit=1, device=device, bootstrap=0, save_images=False)
    return {"images": len(res.rows), **_scalars(res.summary)}


STAGES = {"presets": stage_presets, "gen_dpo": stage_gen_dpo, "build_pair": stage_build_pair,
          "clip_dpo": stage_clip_dpo, "zero_shot": stage_zero_shot}


def _child(name: str, work: str, device: str, threads: int, queue) -> None:
    t_import = time.perf_counter()
    _setup(threads)
    import torch  # noqa: F401  (import cost outside the stage's timing)

    t0 = time.perf_counter()
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system CPU seconds (the stage's own below)
    try:
        info, ok = STAGES[name](Path(work), device), True
    except Exception as err:  # reported, the other stages still run
        info, ok = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}, False
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss / 2**20
    cuda_peak = None
    if device.startswith("cuda"):
        import torch

        cuda_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    queue.put({"stage": name, "ok": ok, "wall_s": round(wall, 1), "startup_s": round(t0 - t_import, 1),
               "cpu_s": round(usage.ru_utime + usage.ru_stime - cpu0, 1),
               "peak_rss_gib": round(peak, 2), "cuda_peak_gib": cuda_peak, "info": info})


def run_stage(name: str, work: Path, device: str, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, str(work), device, threads, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        return {"stage": name, "ok": False, "info": {"error": f"process exited with code {proc.exitcode}"}}
    return queue.get()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--out", default=None)
    p.add_argument("--append", action="store_true", help="replace only the stages run now in an existing --out JSON")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="negdpo_real_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    names = [s for s in a.stages.split(",") if s]
    if names[0] != "presets":
        names.insert(0, "presets")
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = []
    for name in names:
        rows.append(run_stage(name, work, a.device, a.threads))
        r = rows[-1]
        print(f"{name:<11} {'ok ' if r['ok'] else 'FAIL'} {r.get('wall_s', 0):8.1f} s  peak RSS "
              f"{r.get('peak_rss_gib', 0):6.2f} GiB  {json.dumps(r['info'])[:160]}", flush=True)
    total = time.perf_counter() - t0
    import torch

    env = {"device": a.device, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch": torch.__version__, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
           "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None, "size_px": SIZE}
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"real_size_smoke_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.append and out.is_file():  # a rerun of some stages: keep the others, with the environment of each run
        old = json.loads(out.read_text())
        rerun = {r["stage"] for r in rows if r["stage"] in a.stages.split(",")}  # presets: cache hit, keep the build
        rows = [r for r in old["stages"] if r["stage"] not in rerun] + [r for r in rows if r["stage"] in rerun]
        rows.sort(key=lambda r: list(STAGES).index(r["stage"]))
        env = {**env, "earlier_runs": old["env"].get("earlier_runs", []) + [old["env"]],
               "rerun_stages": sorted(rerun)}
        total = sum(r.get("wall_s", 0) + r.get("startup_s", 0) for r in rows)
    report = {"env": env, "total_wall_s": round(total, 1), "ok": all(r["ok"] for r in rows), "stages": rows}
    out.write_text(json.dumps(report, indent=1))
    print(f"total {total:.0f} s -> {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
