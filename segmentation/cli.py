r"""``negdpo evaluate``: zero-shot segmentation of a scan folder with one or more CLIP checkpoints.

Example (offline, tiny models)::

    negdpo phantoms --out /tmp/ph
    negdpo evaluate --data /tmp/ph --split test --clip tiny=tiny --sam tiny --out /tmp/eval
    negdpo evaluate --data /tmp/ph --clip base=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \
        dpo=local-dir:runs/clip_dpo --sam vit_h --sam-checkpoint sam_vit_h_4b8939.pth --out /tmp/eval

--out holds one evaluation: the same command again replaces its outputs; other settings are refused
unless --overwrite_output_dir. Open OUT/index.html for the per-image overlays, sortable by Dice.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from negdpo.core.window import add_reading_args

from .evaluate import DEFAULT_CONTROL, EvalConfig, evaluate

USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)  # bad input, missing file or weights: one line


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
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="negdpo evaluate", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="scan folder ({split}_images, {split}_masks)")
    p.add_argument("--split", default=d.split)
    p.add_argument("--clip", nargs="+", action="extend", default=None, metavar="NAME=CKPT",
                   help="checkpoints (repeatable; names unique): report name = tiny | hf-hub:<id> | "
                        "local-dir:<folder> (default tiny=tiny)")
    p.add_argument("--out", required=True, help="output folder (one evaluation per folder)")
    p.add_argument("--overwrite_output_dir", "--overwrite-output-dir", action="store_true",
                   help="replace the outputs of an earlier evaluation with other settings in --out")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    g = p.add_argument_group("saliency")
    g.add_argument("--saliency", default=d.saliency,
                   help="m2ib | surgery | vlsam (VLM attention flow) | oracle (blurred ground truth)")
    g.add_argument("--align", choices=["crop", "stretch"], default=d.align,
                   help="crop: map aligned with the preprocessing crop; stretch: the public code's stretch")
    g.add_argument("--seed", type=int, default=d.seed, help="base seed (per-image seeds derive from it)")
    g.add_argument("--m2ib-layer", type=int, default=None, help="bottleneck after this block (default n_blocks-3)")
    g.add_argument("--m2ib-beta", type=float, default=d.m2ib_beta,
                   help="bottleneck weight (default per modality: brain MRI 2.0, breast US 1.0, other 1.0)")
    g.add_argument("--m2ib-steps", type=int, default=d.m2ib_steps)
    g.add_argument("--m2ib-lr", type=float, default=d.m2ib_lr)
    g.add_argument("--m2ib-samples", type=int, default=d.m2ib_samples)
    g.add_argument("--m2ib-target", choices=["prompt", "contrast"], default=d.m2ib_target,
                   help="contrast: the prompt's embedding minus the healthy report's of its modality (not in "
                        "MedCLIP-SAMv2; docs/saliency_levers.md)")
    g.add_argument("--m2ib-readout", choices=["capacity", "lambda"], default=d.m2ib_readout,
                   help="capacity (MedCLIP-SAMv2) | lambda: the kept share of each token")
    g.add_argument("--surgery-start", type=int, default=None, help="first v-v block (default n_blocks//2)")
    g.add_argument("--oracle-sigma", type=float, default=d.oracle_sigma)
    g.add_argument("--vlm", default=d.vlm, help="vlsam: tiny | a Qwen2-VL hub id | a folder (e.g. from vlm_train)")
    g.add_argument("--vlsam-points", type=int, default=d.vlsam_points, help="vlsam: positive SAM points (peaks)")
    g.add_argument("--vlsam-negative", type=int, default=d.vlsam_negative, help="vlsam: negative SAM points")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per saliency batch")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default=None, help="JSON {file name: text} (default: the folder's prompts.json)")
    g.add_argument("--prompt-template", default=None, help="one text for all, {name}/{stem} filled in")
    g.add_argument("--control-prompt", default=DEFAULT_CONTROL, help="irrelevant prompt for the control")
    g.add_argument("--no-control", action="store_true", help="skip the irrelevant-prompt control")
    g = p.add_argument_group("post-processing")
    g.add_argument("--post", choices=["kmeans", "threshold", "otsu"], default=d.post)
    g.add_argument("--threshold", type=float, default=d.threshold)
    g.add_argument("--num-components", type=int, default=d.num_components, help="K largest components (0 = all)")
    g.add_argument("--ties", choices=["exact", "parity"], default=d.ties)
    g.add_argument("--post-foreground", action="store_true",
                   help="keep the coarse mask inside the scan's anatomy (Otsu foreground, filled hull)")
    g.add_argument("--kmeans-parity", action="store_true", help="8-bit, 256x256 nearest resampling as public")
    g = p.add_argument_group("SAM")
    g.add_argument("--segmenter", default=d.segmenter,
                   help="sam: the zero-shot chain | prompt-free:DIR: a model trained by seg_train.py "
                        "(prompt-free; saliency and prompt options are ignored)")
    g.add_argument("--sam", default=d.sam, help="none | tiny | vit_b | vit_l | vit_h")
    g.add_argument("--sam-checkpoint", default=None)
    g.add_argument("--sam-prompt", choices=["box", "point", "both"], default=d.sam_prompt)
    g.add_argument("--box-mode", choices=["union", "per_component"], default=d.box_mode)
    g.add_argument("--num-points", type=int, default=d.num_points)
    g.add_argument("--num-negative", type=int, default=d.num_negative)
    g.add_argument("--multimask", action="store_true")
    g.add_argument("--multimask-select", choices=["best", "union"], default=d.multimask_select)
    g = p.add_argument_group("run")
    g.add_argument("--tolerance", type=float, default=d.tolerance, help="NSD tolerance in pixels")
    g.add_argument("--device", default=d.device)
    g.add_argument("--limit", type=int, default=None, help="first N scans only")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable/mismatched files")
    g.add_argument("--no-images", action="store_true", help="metrics only, no PNG outputs")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap)
    add_reading_args(p)
    return p


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


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        clips = _clips(a.clip or ["tiny=tiny"])
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    _log_to_stderr()
    try:
        result = evaluate(a.data, clips, a.out, overwrite_output_dir=a.overwrite_output_dir, **_options(a))
    except USER_ERRORS as err:
        if a.debug:
            raise
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"negdpo evaluate: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 1
    for name, s in result.summary["checkpoints"].items():
        dice = s["dice"]
        print(f"{name}: Dice {dice['mean']:.4f} ± {dice['std']:.4f} (n={dice['n']}), "
              f"control Dice {s['control_dice']['mean']:.4f}, empty coarse {s['empty_coarse']}")
    print(f"wrote {result.out}/report.md" + (f" and {result.out}/index.html" if (result.out / "index.html").exists()
                                               else ""))
    return 0
