"""Zero-shot segmentation evaluation of CLIP checkpoints (MedCLIP-SAMv2 chain).

Per batch of scans: for every checkpoint, saliency (real prompt, and the irrelevant control prompt)
-> coarse mask; then per scan the SAM image embedding is computed once and every checkpoint's (and
control's) coarse mask is prompted against it. ``sam="none"`` scores the coarse mask itself.

Outputs (``docs/method.md#evaluation-output``), under ``out``::

    saliency/<stem>.png  coarse/<stem>.png  masks/<stem>.png  overlays/<stem>.png
    metrics.csv  summary.json  report.md  dice_bar.png  config.json

    index.html  (per-image overlays of all checkpoints side by side, sortable by Dice)

With several checkpoints the image folders get one subfolder per checkpoint name
(``saliency/<checkpoint>/<stem>.png``); with one checkpoint they are flat. ``metrics.csv`` names
each row's files (``saliency_path``, ``mask_path``, ``overlay_path``), so readers need not rebuild
paths. Overlays (``report.write_overlay``) are one labelled row: image | saliency | coarse mask |
ground truth | prediction, with the Dice on the prediction and a legend. Control-prompt maps are not saved.

The output folder holds one evaluation: the same settings again replace its outputs; other settings
(or another command's folder) are refused unless ``overwrite_output_dir=True``, which removes the
earlier outputs first (other files stay). A lock file keeps two runs out of one folder
(``negdpo.core.outdir``). Checkpoint names must be unique (also ignoring case: they name folders),
as must image names without extension. Inputs are checked before any model is loaded.

Headline statistics are over scans with a lesion; scans without one (phantom test splits have
them) are scored too (both-empty = 1, see ``metrics``) and summarised as a false-positive rate.

Each row also scores the raw saliency map itself, before post-processing (``saliency_metrics``; NaN without
a lesion): ``sal_auroc``, ``sal_ap``, ``sal_pointing`` (tolerance = ``tolerance`` px) and ``sal_partial_r``
(given local brightness), over the anatomy and the lesion, and the same for the control prompt's map
(``control_sal_*``). They reuse the maps already computed: no extra model pass
(docs/method.md#saliency-metrics).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from negdpo.core.window import ScanReading, reading_options

from . import metrics as M
from . import saliency_metrics as SM
from .eval_output import EvalResult, image_path, write_outputs
from .postprocess import coarse_mask, foreground_mask
from .sam_prompt import SamConfig, SamSegmenter

logger = logging.getLogger(__name__)
DEFAULT_TEMPLATE = "a medical scan showing a tumor"
DEFAULT_CONTROL = "a photo of a cat sitting on a chair"
OWNED = ("saliency", "coarse", "masks", "overlays", "metrics.csv", "summary.json", "report.md", "dice_bar.png",
         "config.json", "index.html")


@dataclass
class EvalConfig(ScanReading):
    """All options of one evaluation (``negdpo evaluate --help`` documents each); window/size: ScanReading."""

    data: str | None = field(default=None, metadata={"help": "scan folder ({split}_images, {split}_masks)"})
    split: str = field(default="test", metadata={"help": "split of the folder to evaluate"})
    clips: dict[str, str] = field(
        default_factory=lambda: {"tiny": "tiny"}, metadata={"help": "checkpoints NAME=CKPT (repeatable; names unique): report name = tiny | hf-hub:<id> | local-dir:<folder> (default tiny=tiny)"})
    out: str | None = field(default=None, metadata={"help": "output folder (one evaluation per folder)"})
    saliency: str = field(
        default="m2ib", metadata={"help": "m2ib | surgery | vlsam (VLM attention flow) | oracle (blurred ground truth)"})
    align: Literal["crop", "stretch"] = field(
        default="crop", metadata={"help": "crop: map aligned with the preprocessing crop; stretch: the public code's stretch"})
    seed: int = field(default=12, metadata={"help": "base seed (per-image seeds derive from it)"})
    m2ib_layer: int | None = field(
        default=None, metadata={"help": "M2IB bottleneck after this vision block (default n_blocks-3)"})
    m2ib_beta: float | None = field(
        default=None, metadata={"help": "M2IB bottleneck weight (default per modality: brain MRI 2.0, breast US 1.0, other 1.0)"})
    m2ib_steps: int = field(default=10, metadata={"help": "M2IB optimisation steps per image"})
    m2ib_lr: float = field(default=1.0, metadata={"help": "M2IB learning rate of the bottleneck parameters"})
    m2ib_samples: int = field(default=10, metadata={"help": "M2IB fresh noise draws per step"})
    m2ib_target: Literal["prompt", "contrast"] = field(
        default="prompt", metadata={"help": "prompt | contrast: the prompt's embedding minus the healthy report's of its modality (not in MedCLIP-SAMv2; docs/saliency_levers.md)"})
    m2ib_readout: Literal["capacity", "lambda"] = field(
        default="capacity", metadata={"help": "capacity (MedCLIP-SAMv2) | lambda: the kept share of each token"})
    surgery_start: int | None = field(
        default=None, metadata={"help": "CLIP Surgery: first v-v attention block (default n_blocks//2)"})
    oracle_sigma: float = field(
        default=0.02, metadata={"help": "oracle: blur sigma as a fraction of min(H, W)"})
    vlm: str = field(
        default="tiny", metadata={"help": "vlsam: tiny | a Qwen2-VL hub id | a folder (e.g. from vlm_train)"})
    vlsam_points: int = field(default=3, metadata={"help": "vlsam: positive SAM points (peaks)"})
    vlsam_negative: int = field(default=3, metadata={"help": "vlsam: negative SAM points"})
    post: Literal["kmeans", "threshold", "otsu"] = field(
        default="kmeans", metadata={"help": "saliency -> coarse mask: kmeans (2 clusters) | threshold (--threshold) | otsu"})
    threshold: float = field(
        default=0.3, metadata={"help": "with --post threshold: saliency cut-off in [0, 1]"})
    post_foreground: bool = field(
        default=False, metadata={"help": "keep the coarse mask inside the scan's anatomy (Otsu foreground, filled hull)"})
    num_components: int = field(
        default=1, metadata={"help": "K largest components of the coarse mask kept (0 = all)"})
    ties: Literal["exact", "parity"] = field(
        default="exact", metadata={"help": "components of equal area at the K-th place: exact (keep K) | parity (keep all, as the public code)"})
    kmeans_parity: bool = field(
        default=False, metadata={"help": "8-bit, 256x256 nearest resampling before k-means, as the public code"})
    sam: str = field(
        default="tiny", metadata={"help": "none (the coarse mask is the prediction) | tiny | vit_b | vit_l | vit_h"})
    sam_checkpoint: str | None = field(
        default=None, metadata={"help": "SAM weights file (.pth) (default: the preset's, or found in ./checkpoints or $SAM_CHECKPOINT_DIR)"})
    sam_prompt: Literal["box", "point", "both"] = field(
        default="box", metadata={"help": "SAM prompts from the coarse mask: box | point | both"})
    box_mode: Literal["union", "per_component"] = field(
        default="union", metadata={"help": "box prompts: union (one box) | per_component (one box per component)"})
    num_points: int = field(
        default=10, metadata={"help": "point prompts: positive points sampled in the coarse mask"})
    num_negative: int = field(
        default=0, metadata={"help": "point prompts: negative points sampled in the background"})
    multimask: bool = field(
        default=False, metadata={"help": "SAM returns 3 masks per prompt (--multimask_select picks)"})
    multimask_select: Literal["best", "union"] = field(
        default="best", metadata={"help": "with --multimask: best (highest predicted IoU) | union"})
    prompts: str | None = field(
        default=None, metadata={"help": "JSON {file name: text} (default: the folder's prompts.json)"})
    prompt_template: str | None = field(
        default=None, metadata={"help": "one text for all, {name}/{stem} filled in"})
    control_prompt: str | None = field(
        default=DEFAULT_CONTROL, metadata={"help": "irrelevant prompt for the control"})
    tolerance: float = field(default=2.0, metadata={"help": "NSD tolerance in pixels"})
    batch_size: int = field(default=8, metadata={"help": "images per saliency batch"})
    device: str = field(
        default="auto", metadata={"help": "torch device: auto (cuda when available) | cpu | cuda[:N]"})
    limit: int | None = field(default=None, metadata={"help": "first N scans only (default: all)"})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "unreadable or mismatched files: raise (stop) | skip (and count)"})
    save_images: bool = field(
        default=True, metadata={"help": "write PNG overlays and index.html next to the metrics"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples of the confidence intervals"})
    segmenter: str = field(
        default="sam", metadata={"help": "sam: the zero-shot chain | prompt-free:DIR: a model trained by seg_train.py (prompt-free; saliency and prompt options are ignored)"})


def _check_models(cfg: EvalConfig) -> None:
    """Every CLIP checkpoint (when the saliency uses CLIP) and the SAM weights resolve, before any folder is
    claimed or a model loads; a missing one is a ``ModelNotAvailableError`` naming its flag."""
    from negdpo.core.models import ModelNotAvailableError, resolve_clip, resolve_sam

    checks = [(f"--clip {name}={ckpt}", lambda c=ckpt: resolve_clip(c)) for name, ckpt in cfg.clips.items()
              if cfg.saliency not in ("oracle", "vlsam")]
    if cfg.sam != "none":
        checks.append((f"--sam {cfg.sam}", lambda: resolve_sam(cfg.sam, cfg.sam_checkpoint)))
    for flag, resolve in checks:
        try:
            resolve()
        except ModelNotAvailableError as err:
            raise ModelNotAvailableError(f"{flag}: {err}") from err


def _check_names(clips: dict[str, str]) -> None:
    if not clips:
        raise ValueError("no CLIP checkpoint given (use NAME=CKPT, e.g. tiny=tiny)")
    seen: dict[str, str] = {}
    for name in clips:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in (".", ".."):
            raise ValueError(f"checkpoint name '{name}' must be letters, digits, '_', '.', '+' or '-'")
        if name.lower() in seen:
            raise ValueError(f"checkpoint names '{seen[name.lower()]}' and '{name}' differ only in case; their "
                             "output folders would collide: give each checkpoint its own name")
        seen[name.lower()] = name


def _check_scan_names(scans: Sequence) -> None:
    stems: dict[str, str] = {}
    for s in scans:
        stem = Path(s.name).stem
        if stem in stems:
            raise ValueError(f"scans '{stems[stem]}' and '{s.name}' share the name '{stem}'; their outputs "
                             "would overwrite each other: rename one")
        stems[stem] = s.name


def resolve_prompts(scans: Sequence, cfg: EvalConfig) -> list[str]:
    """Template (``{name}``/``{stem}`` filled in) > JSON file > the scan's own prompt > default template."""
    from negdpo.core.scans import read_prompts

    table: dict[str, str] = read_prompts(cfg.prompts) if cfg.prompts else {}
    out = []
    for s in scans:
        stem = Path(s.name).stem
        if cfg.prompt_template:
            try:
                out.append(cfg.prompt_template.format(name=s.name, stem=stem))
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"prompt template '{cfg.prompt_template}': only {{name}} and {{stem}} can be "
                                 f"filled in ({type(err).__name__}: {err})") from None
        elif cfg.prompts:
            text = table.get(s.name, table.get(stem))
            if text is None:
                raise ValueError(f"{cfg.prompts}: no prompt for image '{s.name}' (add it or use --prompt_template)")
            out.append(text)
        else:
            out.append(getattr(s, "prompt", None) or DEFAULT_TEMPLATE)
    return out


def load_scans(cfg: EvalConfig, scans: Sequence | None = None) -> tuple[list, list]:
    if scans is None:
        from negdpo.core.scans import ScanFolder

        if not cfg.data:
            raise ValueError("no data: pass a scan folder (--data) or scans")
        folder = ScanFolder(cfg.data, on_error=cfg.on_error, **reading_options(cfg))
        scans = folder.load_split(cfg.split)
        skipped = list(folder.skipped)
    else:
        skipped = []
    scans = list(scans)[: cfg.limit] if cfg.limit else list(scans)
    if not scans:
        raise ValueError(f"no scans to evaluate in {cfg.data} split '{cfg.split}'")
    return scans, skipped


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _saliency_options(cfg: EvalConfig) -> dict[str, Any]:
    return {"layer": cfg.m2ib_layer, "beta": cfg.m2ib_beta, "steps": cfg.m2ib_steps, "lr": cfg.m2ib_lr,
            "samples": cfg.m2ib_samples, "target": cfg.m2ib_target, "readout": cfg.m2ib_readout,
            "surgery_start": cfg.surgery_start, "oracle_sigma": cfg.oracle_sigma, "vlm": cfg.vlm}


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    """What makes two evaluations the same run (the output folder and the device do not)."""
    settings = asdict(cfg)
    for key in ("out", "device"):
        settings.pop(key)
    return settings


def evaluate(data: str | Path | None = None, clips: dict[str, str] | None = None, out: str | Path | None = None,
             *, scans: Sequence | None = None, config: EvalConfig | None = None, overwrite_output_dir: bool = False,
             **options: Any) -> EvalResult:
    """Run the chain and write the outputs (if ``out``); returns per-image rows and the summary.

    ``data``: a scan folder (or pass ``scans``: objects with ``name``, ``image``, ``mask``, optional
    ``prompt``). ``clips``: {report name: CLIP name} (``"tiny"``, ``hf-hub:…``, ``local-dir:…``).
    ``overwrite_output_dir``: replace the outputs of an earlier, different evaluation in ``out``.
    ``options``: any ``EvalConfig`` field, e.g. ``saliency="oracle", sam="none"``.
    """
    import contextlib

    from negdpo.core.outdir import output_dir

    from .saliency import get

    cfg = config or EvalConfig()
    unknown = sorted(set(options) - {f.name for f in fields(EvalConfig)})
    if unknown:
        raise ValueError(f"unknown evaluation option(s) {unknown}")
    cfg = EvalConfig(**{**asdict(cfg), **options,
                        **({"data": str(data)} if data is not None else {}),
                        **({"clips": dict(clips)} if clips is not None else {}),
                        **({"out": str(out)} if out is not None else {})})
    # every input is checked before a model loads
    _check_names(cfg.clips)
    from .prompt_free.evaluation import prompt_free_dir, run_prompt_free  # stage 2 (torchvision): on use

    prompt_free = prompt_free_dir(cfg.segmenter) is not None  # a bad --segmenter / DIR fails here
    if not prompt_free:
        _check_models(cfg)
    method = get(cfg.saliency)
    scan_list, skipped = load_scans(cfg, scans)
    _check_scan_names(scan_list)
    prompts = resolve_prompts(scan_list, cfg)
    out_dir = Path(cfg.out) if cfg.out else None
    folder = (output_dir(out_dir, "evaluate", overwrite_output_dir, owned=OWNED, settings=_settings(cfg))
              if out_dir is not None else contextlib.nullcontext())
    with folder:
        if prompt_free:  # a trained prompt generator: no CLIP, saliency or prompt
            return run_prompt_free(cfg, scan_list, skipped, out_dir)
        return _run(cfg, method, scan_list, skipped, prompts, out_dir)


def _run(cfg: EvalConfig, method: Any, scan_list: list, skipped: list, prompts: list[str],
         out_dir: Path | None) -> EvalResult:
    from negdpo.core.config import code_version, derive_seed, resolve_device
    from negdpo.core.imageio import save_png, to_rgb_uint8
    from negdpo.core.models import load_clip, load_sam

    from .report import summarise, write_overlay
    from .saliency import SaliencyContext

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    multi = len(cfg.clips) > 1
    needs_clip = cfg.saliency not in ("oracle", "vlsam")  # vlsam loads its VLM (cfg.vlm) itself
    bundles = {name: (load_clip(ckpt, device) if needs_clip else None) for name, ckpt in cfg.clips.items()}
    segmenter = None
    if cfg.sam != "none":
        sam_cfg = SamConfig(prompt=cfg.sam_prompt, box_mode=cfg.box_mode, num_points=cfg.num_points,
                            num_negative=cfg.num_negative, multimask=cfg.multimask,
                            multimask_select=cfg.multimask_select, ties=cfg.ties)
        segmenter = SamSegmenter(load_sam(cfg.sam, cfg.sam_checkpoint, device), sam_cfg)
    contexts = {name: SaliencyContext(clip=b, device=device, align=cfg.align, seed=cfg.seed,
                                      options=_saliency_options(cfg)) for name, b in bundles.items()}
    control = cfg.control_prompt if cfg.saliency != "oracle" else None  # the oracle ignores prompts

    def to_coarse(sal: np.ndarray, image: np.ndarray) -> np.ndarray:
        region = foreground_mask(image) if cfg.post_foreground else None
        return coarse_mask(sal, cfg.post, cfg.threshold, cfg.num_components, cfg.ties, cfg.kmeans_parity, region)

    rows: list[dict[str, Any]] = []
    timing = {"saliency_s": 0.0, "sam_s": 0.0, "metrics_s": 0.0}
    for start in range(0, len(scan_list), cfg.batch_size):
        batch, batch_prompts = scan_list[start:start + cfg.batch_size], prompts[start:start + cfg.batch_size]
        per_ckpt: dict[str, dict[str, list]] = {}
        t0 = time.perf_counter()
        for name, ctx in contexts.items():
            sal = method(ctx, batch, batch_prompts)
            ctl = method(ctx, batch, [control] * len(batch)) if control else [None] * len(batch)
            per_ckpt[name] = {"sal": sal, "ctl": ctl,
                              "coarse": [to_coarse(s, sc.image) for s, sc in zip(sal, batch)],
                              "ctl_coarse": [to_coarse(s, sc.image) if s is not None else None
                                             for s, sc in zip(ctl, batch)]}
        timing["saliency_s"] += time.perf_counter() - t0
        for i, scan in enumerate(batch):
            point_seed = derive_seed("points", scan.name, base=cfg.seed)
            t0 = time.perf_counter()
            preds: dict[str, tuple] = {}
            if segmenter is not None:
                segmenter.set_image(to_rgb_uint8(scan.image))  # once per image, shared by all checkpoints
            for name, r in per_ckpt.items():
                for key, cm in (("real", r["coarse"][i]), ("ctl", r["ctl_coarse"][i])):
                    if cm is None:
                        continue
                    if segmenter is None:
                        preds[(name, key)] = (cm, {"empty_coarse": not cm.any(), "n_prompts": 0})
                    elif cfg.saliency == "vlsam":  # VL-SAM: SAM points from the map's peaks, not the coarse mask
                        from .saliency.vlsam import segment_map

                        preds[(name, key)] = segment_map(segmenter.predictor, r["sal" if key == "real" else "ctl"][i],
                                                         cfg.vlsam_points, cfg.vlsam_negative)
                    else:
                        preds[(name, key)] = segmenter.segment(cm, point_seed)
            timing["sam_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            gt = np.asarray(scan.mask, bool)
            ref = SM.reference(scan.image, gt) if gt.any() else None  # once per scan, shared by every map
            for name, r in per_ckpt.items():
                pred, info = preds[(name, "real")]
                sal, cm = r["sal"][i], r["coarse"][i]
                row: dict[str, Any] = {"checkpoint": name, "image": scan.name, "positive": int(gt.any()),
                                       "prompt": batch_prompts[i], "gt_area": int(gt.sum()),
                                       "coarse_area": int(cm.sum()), "pred_area": int(pred.sum()),
                                       "empty_coarse": int(info["empty_coarse"]), "n_prompts": info["n_prompts"]}
                row.update(M.all_metrics(pred, gt, cfg.tolerance))
                row["coarse_dice"] = M.dice(cm, gt)
                row["coarse_nsd"] = M.nsd(cm, gt, cfg.tolerance)
                if (name, "ctl") in preds:
                    row["control_dice"] = M.dice(preds[(name, "ctl")][0], gt)
                    row["control_coarse_dice"] = M.dice(r["ctl_coarse"][i], gt)
                    row["control_saliency_corr"] = _corr(sal, r["ctl"][i])
                else:
                    row.update(control_dice=math.nan, control_coarse_dice=math.nan, control_saliency_corr=math.nan)
                for prefix, smap in (("", sal), ("control_", r["ctl"][i])):
                    scores = (SM.saliency_metrics(smap, ref, cfg.tolerance) if ref is not None and smap is not None
                              else dict.fromkeys(SM.COLUMNS, math.nan))
                    row.update({prefix + k: v for k, v in scores.items()})
                row["saliency_path"] = row["mask_path"] = row["overlay_path"] = ""
                if out_dir is not None and cfg.save_images:
                    paths = {k: image_path(out_dir, k, name, scan.name, multi)
                             for k in ("saliency", "coarse", "masks", "overlays")}
                    save_png(paths["saliency"], sal)
                    save_png(paths["coarse"], cm)
                    save_png(paths["masks"], pred)
                    write_overlay(paths["overlays"], scan.image, sal, cm, pred, gt, row["dice"],
                                  title=f"{scan.name} | checkpoint {name} | prompt: {batch_prompts[i]}")
                    for key, kind in (("saliency_path", "saliency"), ("mask_path", "masks"),
                                      ("overlay_path", "overlays")):
                        row[key] = paths[kind].relative_to(out_dir).as_posix()
                rows.append(row)
            timing["metrics_s"] += time.perf_counter() - t0
        logger.info("evaluated %d/%d scans", min(start + cfg.batch_size, len(scan_list)), len(scan_list))
    timing["total_s"] = time.perf_counter() - t_start
    summary = summarise(rows, list(cfg.clips), n_boot=cfg.bootstrap)
    summary.update(config=asdict(cfg), device=device, code_version=code_version(), timing=timing,
                   skipped=[{"file": f, "reason": why} for f, why in skipped],
                   layout="per-checkpoint subfolders" if multi else "flat")
    return write_outputs(out_dir, cfg, summary, rows)
