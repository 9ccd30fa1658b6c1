"""Judging step of a pair build: score one positive's candidates and turn them into rows of each kind.

Per source: the composite judge scores the valid candidates and the positive itself; the best candidate
is ``chosen`` and the worst (or the positive, ``--rejected positive``) ``rejected`` of a generator row.
CLIP rows use lesion-ness = 1 - composite score: the real positive should win for its lesion text
(``clip_t2i``), and each image should prefer its own text (``clip_i2t``). Scores closer than ``tie_eps``
drop the row with a reason. A source whose generation failed (too few valid candidates) makes the item
*failed*: nothing is written for it, so the next run retries it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
from PIL import Image

from .config import BuildConfig
from .generate import CandidateGenerator, candidate_seeds
from .items import Item
from .schema import difficulty_of

I2T_QUESTION = "Which description matches this image?"


@dataclass
class Outcome:
    """Rows of one item by kind; ``dropped`` = why some rows are missing; ``failed`` = retry next run."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    dropped: str | None = None
    failed: str | None = None


def png(arr: np.ndarray) -> dict:
    """8-bit PNG bytes of a float [0, 1] (or uint8) image, as a ``datasets.Image`` value."""
    from negdpo.core.imageio import to_uint8

    u8 = to_uint8(arr) if arr.dtype != np.uint8 else arr
    buf = BytesIO()
    Image.fromarray(u8, "L" if u8.ndim == 2 else "RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


class RowMaker:
    def __init__(self, cfg: BuildConfig, kinds: list[str], judge, gen: CandidateGenerator, code_version: str):
        self.cfg, self.kinds, self.judge, self.gen, self.code_version = cfg, kinds, judge, gen, code_version
        self.float_shape: tuple[int, int] | None = None  # --store_arrays: one (H, W) per build
        self.need = 2 if cfg.rejected == "worst" else 1  # valid candidates a source must give

    def _check_store(self, it: Item, image: np.ndarray) -> None:
        if image.ndim != 2:
            raise ValueError(f"{it.file}: --store_arrays supports grayscale scans only")
        if self.float_shape is None:
            self.float_shape = image.shape
        if image.shape != self.float_shape:
            raise ValueError(f"{it.file}: size {image.shape} differs from {self.float_shape}; "
                             "--store_arrays needs one size per build")

    def rows_for(self, it: Item, scan, mask: np.ndarray, gen_prompt: str, lesion_text: str, healthy_text: str,
                 cands: dict[str, list[np.ndarray]], jitem, counters: Counter) -> Outcome:
        """Rows of every kind for one positive; ``cands`` = candidates per source."""
        cfg, store = self.cfg, self.cfg.store_arrays
        if store:
            self._check_store(it, scan.image)
        judged = {}
        for source, imgs in cands.items():
            seeds = candidate_seeds(cfg, it.key, source, len(imgs))
            valid = [(im, s) for im, s in zip(imgs, seeds) if im is not None and np.isfinite(im).all()]
            counters["failed_candidate"] += len(imgs) - len(valid)
            if len(valid) < self.need:
                return Outcome(failed=f"failed_generation:{source}")
            judged[source] = (valid, *self.judge(jitem, [v[0] for v in valid] + [scan.image]))
        rows: dict[str, list[dict]] = defaultdict(list)
        reasons = []
        base = {"subject_id": it.subject_id, "split": it.split, "modality": it.modality, "file": it.file,
                "code_version": self.code_version, "label_source": self.judge.spec}
        src_png, mask_png = png(scan.image), png(mask.astype(np.uint8) * 255)
        pos_score: float | None = None
        pos_parts: dict = {}
        for source, (valid, scores, parts) in judged.items():
            pos_score, pos_parts = float(scores[-1]), parts[-1]
            scores, parts = scores[:-1], parts[:-1]
            order = np.argsort(-scores, kind="stable")
            b = int(order[0])
            best, best_seed, sb = valid[b][0], valid[b][1], float(scores[b])
            prov = base | self.gen.provenance(source)
            if "generator" in self.kinds:
                if cfg.rejected == "worst":
                    w = int(order[-1])
                    rej, rej_seed, sr, rej_parts = valid[w][0], valid[w][1], float(scores[w]), parts[w]
                else:
                    rej, rej_seed, sr, rej_parts = scan.image, -1, pos_score, pos_parts
                if sb - sr < cfg.tie_eps:
                    reasons.append(f"tie:{source}")
                else:
                    d, bucket = difficulty_of(sb - sr)
                    row = prov | {"pair_id": f"{it.key}#gen:{source}", "prompt": gen_prompt, "source": src_png,
                                  "mask": mask_png, "chosen": png(best), "rejected": png(rej),
                                  "score_chosen": sb, "score_rejected": sr, "difficulty": d,
                                  "difficulty_bucket": bucket, "judge_chosen": json.dumps(parts[b]),
                                  "judge_rejected": json.dumps(rej_parts), "seed_chosen": best_seed,
                                  "seed_rejected": rej_seed, "kind": "generator"}
                    if store:
                        row |= {"source_f32": scan.image, "chosen_f32": best, "rejected_f32": rej}
                    rows["generator"].append(row)
            les_pos, les_neg = 1.0 - pos_score, 1.0 - sb
            if les_pos - les_neg < cfg.tie_eps:
                if "clip_t2i" in self.kinds or "clip_i2t" in self.kinds:
                    reasons.append(f"clip_not_separated:{source}")
                continue
            d, bucket = difficulty_of(les_pos - les_neg)
            if "clip_t2i" in self.kinds:
                row = prov | {"pair_id": f"{it.key}#t2i:{source}", "prompt": lesion_text, "source": src_png,
                              "mask": mask_png, "chosen": src_png, "rejected": png(best),
                              "score_chosen": les_pos, "score_rejected": les_neg, "difficulty": d,
                              "difficulty_bucket": bucket, "judge_chosen": json.dumps(pos_parts),
                              "judge_rejected": json.dumps(parts[b]), "seed_chosen": -1,
                              "seed_rejected": best_seed, "kind": "clip_t2i"}
                if store:
                    row |= {"source_f32": scan.image, "chosen_f32": scan.image, "rejected_f32": best}
                rows["clip_t2i"].append(row)
            if "clip_i2t" in self.kinds:
                d2, b2 = difficulty_of(abs(2 * sb - 1))
                row = prov | {"pair_id": f"{it.key}#i2t:{source}", "image": png(best), "mask": mask_png,
                              "prompt": I2T_QUESTION, "chosen": healthy_text, "rejected": lesion_text,
                              "score_chosen": sb, "score_rejected": 1.0 - sb, "difficulty": d2,
                              "difficulty_bucket": b2, "image_is_real": False, "seed_chosen": best_seed,
                              "seed_rejected": best_seed, "kind": "clip_i2t"}
                if store:
                    row["image_f32"] = best
                rows["clip_i2t"].append(row)
        if "clip_i2t" in self.kinds and pos_score is not None:
            d, bucket = difficulty_of(abs(1 - 2 * pos_score))
            row = base | {"pair_id": f"{it.key}#i2t:real", "image": src_png, "mask": mask_png,
                          "prompt": I2T_QUESTION, "chosen": lesion_text, "rejected": healthy_text,
                          "score_chosen": 1.0 - pos_score, "score_rejected": pos_score, "difficulty": d,
                          "difficulty_bucket": bucket, "image_is_real": True, "gen_model": "real",
                          "gen_adapter_sha": "", "scheduler": "", "steps": 0, "guidance": 0.0, "strength": 0.0,
                          "seed_chosen": -1, "seed_rejected": -1, "kind": "clip_i2t"}
            if store:
                row["image_f32"] = scan.image
            rows["clip_i2t"].append(row)
        return Outcome(dict(rows), ";".join(reasons) or None)
