"""``negdpo build-pairs``: generate, judge and write preference-pair datasets.

    negdpo build-pairs --data DIR --generator tiny --out OUT --k 4
    accelerate launch -m negdpo.preference.pairs.build_cli --data DIR --generator ID --out OUT --k 4   # N processes

Writes ``OUT/data/*.parquet`` + ``OUT/dataset`` (generator pairs), ``OUT/clip_t2i`` and
``OUT/clip_i2t`` (CLIP pairs), ``OUT/build_summary.json`` and ``OUT/report/``. Rerunning the same
command resumes: finished scans are skipped (see ``negdpo.preference.pairs.build``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .build import BuildConfig, run_build


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="negdpo build-pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="scan folder (MedCLIP-SAMv2 layout; phantoms work)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="push every kind as a config (private)")
    p.add_argument("--no-report", action="store_true", help="skip the quality report")
    p.add_argument("--pickapic", action="store_true", help="also write OUT/pickapic (Pick-a-Pic layout)")
    defaults = BuildConfig(data="", out="")
    helps = {"generator": "tiny | hub id | local diffusers folder", "adapter": "LoRA folder (gen_train output)",
             "k": "candidates per positive and source", "judges": "name=weight,... (negdpo.preference.pairs.judges)",
             "sources": "inpaint and/or boundary (latent-boundary negatives)",
             "rejected": "worst (worst-scoring fill) | positive (the positive itself)",
             "kinds": "generator,clip_t2i,clip_i2t", "batch_items": "scans per generator call",
             "chunk_size": "scans per parquet shard",
             "threads": "torch threads per process; pin it (e.g. 1) for CPU runs bit-identical across world sizes", "dilate": "mask dilation in px (stored as `mask`)"}
    for f in dataclasses.fields(BuildConfig):
        if f.name in ("data", "out", "progress"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=helps.get(f.name))
            continue
        ann = str(f.type)
        typ = type(default) if default is not None else (int if "int" in ann else float if "float" in ann else str)
        p.add_argument(flag, type=typ, default=default, help=helps.get(f.name, f"default {default}"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.no_progress)
    try:
        summary = run_build(cfg, push_to_hub=args.push_to_hub, report=not args.no_report)
    except (ValueError, FileNotFoundError) as err:
        print(f"negdpo build-pairs: error: {err}", file=sys.stderr)
        return 2
    if not summary:  # non-main process
        return 0
    if args.pickapic:
        from .pickapic import convert

        convert(cfg.out, f"{cfg.out}/pickapic")
    for f in summary["skipped_files"]:
        print(f"skipped: {f['reason']}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("rows", "rows_this_run", "items_this_run", "dropped",
                                              "seconds") if k in summary}, indent=1))
    if summary.get("scans_per_s"):
        print(f"rate: {summary['scans_per_s']} scans/s; report: {summary.get('report')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
