r"""``negdpo evaluate``: zero-shot segmentation of a scan folder with one or more CLIP checkpoints.

Example (offline, tiny models)::

    negdpo phantoms --out /tmp/ph
    negdpo evaluate --data /tmp/ph --split test --clip tiny=tiny --sam tiny --out /tmp/eval
    negdpo evaluate --data /tmp/ph --clip base=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \
        dpo=local-dir:runs/clip_dpo --sam vit_h --sam_checkpoint sam_vit_h_4b8939.pth --out /tmp/eval

--out holds one evaluation: the same command again replaces its outputs; other settings are refused
unless --overwrite_output_dir. Open OUT/index.html for the per-image overlays, sortable by Dice.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from dataclasses import fields

from negdpo.core.config import parse_flags, underscore_flags
from negdpo.core.console import CommandParser, UserError, one_line, run_main
from negdpo.core.window import add_reading_args

from .evaluate import EvalConfig, evaluate

PROG = "negdpo evaluate"
USER_ERRORS = (KeyError, OSError, RuntimeError)  # besides run_main's: unreadable inputs or weights: one line


def _clips(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, ckpt = v.partition("=")
        if not sep or not name or not ckpt:
            raise argparse.ArgumentTypeError(f"--clip expects NAME=CKPT (e.g. tiny=tiny), got '{v}'")
        if name in out:
            raise argparse.ArgumentTypeError(f"--clip name '{name}' given twice")
        out[name] = ckpt
    return out


def build_parser() -> argparse.ArgumentParser:
    """The flags; an option that is an :class:`EvalConfig` field takes its default and help from the field."""
    d = EvalConfig()
    helps = {f.name: f.metadata["help"] for f in fields(EvalConfig)}
    p = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def opt(group: argparse._ActionsContainer, name: str, **kwargs: object) -> None:
        if kwargs.get("action") != "store_true":
            kwargs.setdefault("default", getattr(d, name))
        group.add_argument(f"--{name}", help=helps[name], **kwargs)

    opt(p, "data", required=True, default=None)
    opt(p, "split")
    p.add_argument("--clip", nargs="+", action="extend", default=None, metavar="NAME=CKPT",
                   help=helps["clips"])
    opt(p, "out", required=True, default=None)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="replace the outputs of an earlier evaluation with other settings in --out")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    g = p.add_argument_group("saliency")
    opt(g, "saliency")
    opt(g, "align", choices=["crop", "stretch"])
    opt(g, "seed", type=int)
    opt(g, "m2ib_layer", type=int)
    opt(g, "m2ib_beta", type=float)
    opt(g, "m2ib_steps", type=int)
    opt(g, "m2ib_lr", type=float)
    opt(g, "m2ib_samples", type=int)
    opt(g, "m2ib_target", choices=["prompt", "contrast"])
    opt(g, "m2ib_readout", choices=["capacity", "lambda"])
    opt(g, "surgery_start", type=int)
    opt(g, "oracle_sigma", type=float)
    opt(g, "vlm")
    opt(g, "vlsam_points", type=int)
    opt(g, "vlsam_negative", type=int)
    opt(g, "batch_size", type=int)
    g = p.add_argument_group("prompts")
    opt(g, "prompts")
    opt(g, "prompt_template")
    opt(g, "control_prompt")
    g.add_argument("--no_control", action="store_true", help="skip the irrelevant-prompt control")
    g = p.add_argument_group("post-processing")
    opt(g, "post", choices=["kmeans", "threshold", "otsu"])
    opt(g, "threshold", type=float)
    opt(g, "num_components", type=int)
    opt(g, "ties", choices=["exact", "parity"])
    opt(g, "post_foreground", action="store_true")
    opt(g, "kmeans_parity", action="store_true")
    g = p.add_argument_group("SAM")
    opt(g, "segmenter")
    opt(g, "sam")
    opt(g, "sam_checkpoint")
    opt(g, "sam_prompt", choices=["box", "point", "both"])
    opt(g, "box_mode", choices=["union", "per_component"])
    opt(g, "num_points", type=int)
    opt(g, "num_negative", type=int)
    opt(g, "multimask", action="store_true")
    opt(g, "multimask_select", choices=["best", "union"])
    g = p.add_argument_group("run")
    opt(g, "tolerance", type=float)
    opt(g, "device")
    opt(g, "limit", type=int)
    g.add_argument("--skip_bad", action="store_true", help="skip (and count) unreadable/mismatched files")
    g.add_argument("--no_images", action="store_true", help="metrics only, no PNG outputs")
    opt(g, "bootstrap", type=int)
    add_reading_args(p)
    return underscore_flags(p)


def _options(a: argparse.Namespace) -> dict:
    """EvalConfig fields from the parsed flags: a flag whose dest is a field name is passed on as is."""
    options = {f.name: getattr(a, f.name) for f in fields(EvalConfig)
               if hasattr(a, f.name) and f.name not in ("data", "clips", "out", "control_prompt")}
    options.update(control_prompt=None if a.no_control else a.control_prompt,
                   on_error="skip" if a.skip_bad else "raise", save_images=not a.no_images)
    return options


def _log_to_stderr() -> None:
    """Progress lines of negdpo's own loggers (the root logger and other libraries are left alone)."""
    log = logging.getLogger("negdpo")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a root handler some library installed would print each line twice


def _main(argv: list[str]) -> int:
    p = build_parser()
    a = parse_flags(p, argv)
    try:
        clips = _clips(a.clip or ["tiny=tiny"])
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    _log_to_stderr()
    try:
        result = evaluate(a.data, clips, a.out, overwrite_output_dir=a.overwrite_output_dir, **_options(a))
    except USER_ERRORS as err:
        if isinstance(err, (UserError, ValueError)) or getattr(err, "errno", None) == errno.ENOSPC:
            raise  # run_main prints these (or the traceback with --debug)
        raise UserError(one_line(err)) from err
    for name, s in result.summary["checkpoints"].items():
        dice = s["dice"]
        print(f"{name}: Dice {dice['mean']:.4f} ± {dice['std']:.4f} (n={dice['n']}), "
              f"control Dice {s['control_dice']['mean']:.4f}, empty coarse {s['empty_coarse']}")
    print(f"wrote {result.out}/report.md" + (f" and {result.out}/index.html" if (result.out / "index.html").exists()
                                               else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors (bad flag, missing data, checkpoint or weights, a refused --out): one line, exit 2."""
    return run_main(PROG, _main, argv)
