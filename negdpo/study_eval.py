"""What the study measures, per image: generator repairs (with and without paste-back), zero-shot
segmentation per prompt (report | word | irrelevant), the oracle-box ceiling, and the harmonic-fill
pair set of the no-generator control. :mod:`negdpo.study_tables` turns the rows into the contract.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

GEN_REPAINT_DILATION = 2  # px the lesion mask is dilated by to give the repaint region (as in pair building)


def subject_of(name: str) -> str:
    """``mri_0003_1.png`` -> ``mri_0003``."""
    return Path(name).stem.rsplit("_", 1)[0]


def held_out_positives(phantoms: Path) -> list:
    """Positives of the val and test subjects (the generators never trained on them)."""
    from negdpo.core.scans import ScanFolder

    folder = ScanFolder(phantoms)
    return [s for split in ("val", "test") if split in folder.splits() for s in folder.load_split(split) if s.positive]


def lesion_groups(phantoms: Path) -> dict[str, str]:
    """{file: mri_bright | mri_dark | us} from ``meta.csv`` (older sets: from modality and contrast sign)."""
    out = {}
    with open(Path(phantoms) / "meta.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["positive"] != "1":
                continue
            group = r.get("group")
            if not group:
                group = "us" if r["modality"] == "us" else (
                    "mri_bright" if float(r["lesion_contrast"]) > 0 else "mri_dark")
            out[r["file"]] = group
    return out


def _residual_lesion(image: np.ndarray, mask: np.ndarray) -> float:
    """1 - the contrast judge: how much the fill stands out from a harmonic interpolation of its surroundings."""
    from negdpo.preference.pairs.judges import ContrastJudge, JudgeItem

    item = JudgeItem(source=image, mask=mask, prompt="", healthy_text="")
    return 1.0 - float(ContrastJudge()(item, [image])[0])


def repaint_mask(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=GEN_REPAINT_DILATION)


def _repairs(method: str, scans: list, masks: list, *, model: str | None, adapter: str | None, device: str,
             steps: int, seed: int, seam_px: float, sampling: dict | None = None) -> dict[bool | None, list[np.ndarray]]:
    """{paste_back: outputs} of one method on ``scans`` (None: the non-learned methods)."""
    from negdpo.core.config import derive_seed
    from negdpo.core.imageio import to_gray
    from negdpo.preference.pairs.judges import harmonic_fill

    if method == "identity":
        return {None: [to_gray(s.image) for s in scans]}
    if method == "harmonic":
        return {None: [harmonic_fill(to_gray(s.image), m) for s, m in zip(scans, masks)]}
    from negdpo.generator.sample import inpaint, load_generator, paste_back_blend

    pipe = load_generator(model or "tiny", adapter=adapter, device=device)
    seeds = [derive_seed("study-gen", s.name, base=seed) for s in scans]
    raw = inpaint(pipe, [s.image for s in scans], masks, [s.prompt or "" for s in scans], seeds,
                  steps=steps, paste_back=False, **(sampling or {}))
    nopaste = [to_gray(np.asarray(o, np.float32)) for o in raw]
    return {False: nopaste, True: [paste_back_blend(to_gray(s.image), o, m, seam_px)
                                   for s, o, m in zip(scans, nopaste, masks)]}


def score_generator(method: str, scans: list, out: Path, *, model: str | None = None, adapter: str | None = None,
                    device: str = "cpu", steps: int = 20, seed: int = 0, seam_px: float = 2.0,
                    sampling: dict | None = None, detector: Any = None, pool_scans: list | None = None,
                    n_boot: int = 1000) -> dict:
    """Repair held-out positives and score them against their twins.

    ``identity`` (no repair) and ``harmonic`` (classical fill) change nothing outside the repaint mask by
    construction (``paste_back`` None). A learned generator samples once without paste-back; the
    pasted output (:func:`negdpo.generator.sample.paste_back_blend`) is derived from the same sample, so
    the two rows differ only by the paste. ``sampling``: ``inpaint``'s ``init`` / ``strength`` (default: from noise).

    Frozen judges (:mod:`negdpo.generator.frozen_judges`, fitted on the pre-training pool only):
    ``detector`` adds ``lesion_prob`` / ``lesion_free`` to every row; ``pool_scans`` (pool positives) are
    repaired the same way to fit the real-vs-generated judge per paste setting, whose AUC on the held-out
    repairs vs their twins is returned under ``realism``.
    """
    from negdpo.core.figures import write_grid
    from negdpo.core.imageio import to_gray
    from negdpo.generator.evaluate import repair_metrics

    opts = dict(model=model, adapter=adapter, device=device, steps=steps, seed=seed, seam_px=seam_px, sampling=sampling)
    masks = [repaint_mask(s.mask) for s in scans]
    outputs = _repairs(method, scans, masks, **opts)
    judged: dict = {"lesion": {}, "realism": []}
    if detector is not None:
        from negdpo.generator.frozen_judges import score_with_judges

        pool_outputs = (_repairs(method, pool_scans, [repaint_mask(s.mask) for s in pool_scans], **opts)
                        if pool_scans else None)
        judged = score_with_judges(detector, method, scans, outputs, pool_scans or None, pool_outputs, seed, n_boot)
    rows = []
    for paste, outs in outputs.items():
        lesion = judged["lesion"].get(paste) or [{}] * len(scans)
        for s, m, o, extra in zip(scans, masks, outs, lesion):
            metrics = repair_metrics(o, to_gray(s.image), to_gray(s.twin), s.mask, m, residual=_residual_lesion)
            rows.append({"method": method, "paste_back": paste, "file": s.name, "subject_id": subject_of(s.name),
                         "modality": s.name.split("_", 1)[0], **metrics, **extra})
    labels = ["positive", "repaint mask"] + [{None: "output", False: "output (no paste-back)",
                                              True: "output (paste-back)"}[p] for p in outputs] + ["healthy twin"]
    grid = [[to_gray(s.image), m.astype(np.float32), *[outs[i] for outs in outputs.values()], to_gray(s.twin)]
            for i, (s, m) in enumerate(list(zip(scans, masks))[:6])]
    write_grid(out / "samples.png", grid, column_labels=labels)
    return {"rows": rows, "grid": str(out / "samples.png"), "realism": json.loads(json.dumps(judged["realism"]))}


def fit_lesion_detector(phantoms: Path, out: Path, seed: int) -> dict:
    """The frozen residual-lesion detector, fitted on the pre-training pool only, and its accuracy on the
    held-out (val + test) real positives vs their twins, overall and per lesion group."""
    from negdpo.core.scans import ScanFolder
    from negdpo.generator.frozen_judges import LesionDetector, detector_report

    pool = ScanFolder(phantoms).load_split("pretrain")
    detector = LesionDetector(seed=seed).fit(pool)
    detector.save(out / "lesion_detector")
    report = detector_report(detector, held_out_positives(phantoms), lesion_groups(phantoms))
    return {"path": str(out / "lesion_detector"), "info": detector.info, "held_out_accuracy": report}


def pool_positives(phantoms: Path, limit: int) -> list:
    """``min(limit, n)`` positives of the pre-training pool, evenly spaced in file order (both modalities stay in)."""
    from negdpo.core.scans import ScanFolder

    pos = [s for s in ScanFolder(phantoms).load_split("pretrain") if s.positive]
    if limit <= 0 or not pos:
        return []
    return [pos[i] for i in np.unique(np.linspace(0, len(pos) - 1, min(limit, len(pos))).round().astype(int))]


def write_harmonic_set(phantoms: Path, out: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A scan folder whose twins are harmonic fills of the positives (the no-generator negatives).

    Positives only (CLIP-DPO pairs need a lesion); images, masks and prompts are the phantoms'.
    """
    from negdpo.core.imageio import save_png, to_gray
    from negdpo.core.scans import ScanFolder
    from negdpo.preference.pairs.judges import harmonic_fill

    folder = ScanFolder(phantoms)
    prompts = {}
    for split in splits:
        for s in folder.load_split(split):
            if not s.positive:
                continue
            save_png(out / f"{split}_images" / s.name, to_gray(s.image))
            save_png(out / f"{split}_masks" / s.name, s.mask)
            save_png(out / f"{split}_twins" / s.name, harmonic_fill(to_gray(s.image), repaint_mask(s.mask)))
            prompts[s.name] = s.prompt or ""
    healthy = {k: v for k, v in folder.prompts.items() if " no " in f" {v.lower()}"}  # healthy texts per modality
    (out / "prompts.json").write_text(json.dumps(prompts | healthy, indent=1, sort_keys=True))
    return out


def long_segmentation_rows(report_rows: list[dict], word_rows: list[dict], groups: dict[str, str],
                           prompt_free: bool = False) -> list[dict]:
    """Per (variant, seed, image, prompt) Dice of positives from the two evaluations.

    ``report_rows``: the evaluation with each scan's report as the prompt and the irrelevant control;
    ``word_rows``: the evaluation with the one-word prompt. Checkpoint names are ``<variant>.s<seed>``.
    ``prompt_free``: rows of a segmenter without a prompt (the prompt generator): one ``report`` row per
    image, no control (its NaN control column is not a Dice).
    """
    out = []
    report_keys = (("report", "dice"),) if prompt_free else (("report", "dice"), ("irrelevant", "control_dice"))
    for rows, prompt_keys in ((report_rows, report_keys), (word_rows, (("word", "dice"),))):
        for r in rows:
            if not int(r.get("positive", 0)):
                continue
            variant, seed = str(r["checkpoint"]).rsplit(".s", 1)
            for prompt, key in prompt_keys:
                out.append({"variant": variant, "seed": int(seed), "image": r["image"],
                            "subject_id": subject_of(r["image"]), "group": groups.get(r["image"], ""),
                            "prompt": prompt, "dice": r.get(key)})
    return out


def oracle_box(phantoms: Path, split: str, sam: str, sam_checkpoint: str | None, device: str) -> list[dict]:
    """Dice of SAM prompted with each positive's ground-truth box: the ceiling of the box-prompted chain."""
    from negdpo.core.imageio import to_rgb_uint8
    from negdpo.core.models import load_sam
    from negdpo.core.scans import ScanFolder
    from negdpo.segmentation import metrics as M
    from negdpo.segmentation.sam_prompt import SamConfig, SamSegmenter

    segmenter = SamSegmenter(load_sam(sam, sam_checkpoint, device), SamConfig(prompt="box", box_mode="union"))
    rows: list[dict[str, Any]] = []
    for s in ScanFolder(phantoms).load_split(split):
        if not s.positive:
            continue
        segmenter.set_image(to_rgb_uint8(s.image))
        pred, _ = segmenter.segment(np.asarray(s.mask, bool), 0)
        rows.append({"image": s.name, "subject_id": subject_of(s.name), "dice": float(M.dice(pred, s.mask))})
    return rows
