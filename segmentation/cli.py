"""``negdpo evaluate``: zero-shot segmentation of a scan folder with one or more CLIP checkpoints.

Example (offline, tiny models)::

    negdpo phantoms --out /tmp/ph
    negdpo evaluate --data /tmp/ph --split test --clip tiny=tiny --sam tiny --out /tmp/eval
    negdpo evaluate --data /tmp/ph --clip base=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \
        dpo=local-dir:runs/clip_dpo --sam vit_h --sam-checkpoint sam_vit_h_4b8939.pth --out /tmp/eval
"""

from __future__ import annotations

import argparse
import logging
import sys

from .evaluate import DEFAULT_CONTROL, EvalConfig, evaluate


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
    p = argparse.ArgumentParser(prog="negdpo evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="scan folder ({split}_images, {split}_masks)")
    p.add_argument("--split", default=d.split)
    p.add_argument("--clip", nargs="+", default=["tiny=tiny"], metavar="NAME=CKPT",
                   help="checkpoints: report name = tiny | hf-hub:<id> | local-dir:<folder>")
    p.add_argument("--out", required=True)
    g = p.add_argument_group("saliency")
    g.add_argument("--saliency", default=d.saliency, help="m2ib | surgery | oracle (blurred ground truth)")
    g.add_argument("--align", choices=["crop", "stretch"], default=d.align,
                   help="crop: map aligned with the preprocessing crop; stretch: the public code's stretch")
    g.add_argument("--seed", type=int, default=d.seed, help="base seed (per-image seeds derive from it)")
    g.add_argument("--m2ib-layer", type=int, default=None, help="bottleneck after this block (default n_blocks-3)")
    g.add_argument("--m2ib-beta", type=float, default=d.m2ib_beta)
    g.add_argument("--m2ib-steps", type=int, default=d.m2ib_steps)
    g.add_argument("--m2ib-lr", type=float, default=d.m2ib_lr)
    g.add_argument("--m2ib-samples", type=int, default=d.m2ib_samples)
    g.add_argument("--surgery-start", type=int, default=None, help="first v-v block (default n_blocks//2)")
    g.add_argument("--oracle-sigma", type=float, default=d.oracle_sigma)
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
    g.add_argument("--kmeans-parity", action="store_true", help="8-bit, 256x256 nearest resampling as public")
    g = p.add_argument_group("SAM")
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        clips = _clips(a.clip)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    options = {k: getattr(a, k) for k in (
        "split", "saliency", "align", "seed", "m2ib_layer", "m2ib_beta", "m2ib_steps", "m2ib_lr", "m2ib_samples",
        "surgery_start", "oracle_sigma", "batch_size", "prompts", "prompt_template", "post", "threshold",
        "num_components", "ties", "kmeans_parity", "sam", "sam_checkpoint", "sam_prompt", "box_mode", "num_points",
        "num_negative", "multimask", "multimask_select", "tolerance", "device", "limit", "bootstrap")}
    options.update(control_prompt=None if a.no_control else a.control_prompt,
                   on_error="skip" if a.skip_bad else "raise", save_images=not a.no_images)
    try:
        result = evaluate(a.data, clips, a.out, **options)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"negdpo evaluate: error: {err}", file=sys.stderr)
        return 1
    for name, s in result.summary["checkpoints"].items():
        dice = s["dice"]
        print(f"{name}: Dice {dice['mean']:.4f} ± {dice['std']:.4f} (n={dice['n']}), "
              f"control Dice {s['control_dice']['mean']:.4f}, empty coarse {s['empty_coarse']}")
    print(f"wrote {result.out}/report.md")
    return 0
