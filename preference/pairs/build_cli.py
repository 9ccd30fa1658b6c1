"""``negdpo build-pairs``: generate, judge and write preference-pair datasets.

    negdpo build-pairs --data DIR --generator tiny --out OUT --k 4
    accelerate launch -m negdpo.preference.pairs.build_cli --data DIR --generator ID --out OUT --k 4   # N processes

OUT is a Hub-style dataset repo: ``OUT/README.md`` (dataset card, one config per pair kind),
``OUT/data/<kind>/<split>-*.parquet`` (``datasets.load_dataset(OUT, "generator")``; also ``clip_t2i``,
``clip_i2t``), ``OUT/<kind>/`` (``datasets.load_from_disk``), ``OUT/build_summary.json`` and
``OUT/report/``. Rerunning the same command resumes: finished scans are skipped, failed ones retried;
a rerun with other settings is refused (use a new --out or --overwrite_output_dir).

Exit status: 0 done, 1 some scans failed (rerun to retry them) or a corrupt shard was set aside,
2 bad settings or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from negdpo.core.config import parse_flags, underscore_flags
from negdpo.core.console import CommandParser, run_main

from .config import FLAGS, BuildConfig  # no torch: --help and setting errors stay fast

PROG = "negdpo build-pairs"
RENAMED_FLAGS = {"--steps": "--sample_steps"}  # old flag -> new (deprecated alias for one release)


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(BuildConfig) if f.name == name)


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help=_help("data"))
    p.add_argument("--out", required=True, help=_help("out"))
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="discard an existing build in --out (e.g. to change its settings)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO",
                   help="upload the dataset repo (card + parquet shards) as a private Hub dataset")
    p.add_argument("--no_report", action="store_true", help="skip the quality report")
    p.add_argument("--pickapic", action="store_true", help="also write OUT/pickapic (Pick-a-Pic layout)")
    defaults = BuildConfig(data="", out="")
    for f in dataclasses.fields(BuildConfig):  # the field's help metadata is the option's only description
        if f.name in ("data", "out", "progress"):
            continue
        flag, default, help_ = f"--{FLAGS.get(f.name, f.name)}", getattr(defaults, f.name), f.metadata["help"]
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=help_)
            continue
        ann = str(f.type)
        typ = type(default) if default is not None else (int if "int" in ann else float if "float" in ann else str)
        p.add_argument(flag, dest=f.name, type=typ, default=default, help=help_)
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return underscore_flags(p)


def _main(argv: list[str]) -> int:
    args = parse_flags(_parser(), argv, RENAMED_FLAGS)
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.no_progress)
    cfg.validate()
    from .build import run_build  # checks --generator, --adapter and --clip before any work
    from .shards import CorruptShardError

    try:
        summary = run_build(cfg, push_to_hub=args.push_to_hub, report=not args.no_report,
                            overwrite_output_dir=args.overwrite_output_dir)
    except CorruptShardError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        import errno

        if err.errno != errno.ENOSPC:
            raise
        from negdpo.core.console import disk_full_message

        print(f"{PROG}: error: {disk_full_message(err, cfg.out)}", file=sys.stderr)
        return 2
    if not summary:  # non-main process
        return 0
    if args.pickapic:
        from .pickapic import convert

        convert(cfg.out, f"{cfg.out}/pickapic")
    for f in summary["skipped_files"]:
        print(f"skipped: {f['reason']}", file=sys.stderr)
    for p in summary["set_aside"]:
        print(f"set aside (unreadable, its scans were rebuilt): {p}", file=sys.stderr)
    print(json.dumps({k: summary[k] for k in ("rows", "rows_this_run", "items_this_run", "dropped",
                                              "seconds") if k in summary}, indent=1))
    if summary.get("scans_per_s"):
        print(f"rate: {summary['scans_per_s']} scans/s; report: {summary.get('report')}")
    if summary["failed"]:
        reasons = sorted({f["reason"] for f in summary["failed"]})
        print(f"negdpo build-pairs: {len(summary['failed'])} scan(s) failed ({', '.join(reasons)}); they are "
              "not marked done: fix the cause and rerun the same command", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """0 done; 1 some scans failed or a corrupt shard was set aside; 2 (one line) bad settings or input."""
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
