"""The study's protocol: each choice the study's numbers depend on, its value and the split it was made on
(``protocol:`` in configs/phantom_study.yaml), and which splits each phase of this run opened.

Only the final evaluations may read the test split: the generator table (phase ``generator_table``: the
generators repair the val and test positives) and the segmentation evaluation (phase ``evaluation``). The study
runs its selection phase (generator training, base CLIPs, pairs, fine-tunes, SAM pre-training, pseudo-labels, VLM
training) with the test split locked (:mod:`negdpo.core.split_lock`), so a selection stage that opened a test
image would have failed the run. ``reads`` counts the files each phase opened per split (each stage's count is
kept in its stamp, so a study rendered from its cache reports what the run that computed it opened).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from negdpo.study.cache import StudyRun

_EVAL_KEYS = ("saliency", "m2ib_beta", "m2ib_steps", "m2ib_samples", "m2ib_target", "surgery_start")
_POST_KEYS = ("post", "post_foreground", "num_components", "kmeans_parity", "ties", "sam_prompt", "box_mode")

CHOICES: dict[str, Callable[[Any], Any]] = {
    "saliency": lambda c: {"method": c.eval_saliency} | {k: v for k, v in c.eval_extra.items() if k in _EVAL_KEYS},
    "post_processing": lambda c: {k: v for k, v in c.eval_extra.items() if k in _POST_KEYS},
    "k": lambda c: c.eval_extra.get("num_components", 1),
    "thresholds": lambda c: {k: v for k, v in c.eval_extra.items() if k in ("threshold", "tolerance")},
    "sam_pretrain_mix": lambda c: {"steps": c.sam_pretrain_steps, **c.sam_pretrain_extra},
    "generator_steps": lambda c: {"autoencoder": c.gen_autoencoder_steps, "sft": c.gen_sft_steps,
                                  "dpo": c.gen_dpo_steps},
    "sampling_start_and_strength": lambda c: {"init": c.gen_init, "strength": c.gen_strength},
    "pair_judges_weights": lambda c: {k: v for k, v in c.pairs_extra.items() if "weight" in k or "judge" in k}
    or "build-pairs defaults",
    "clip_finetune_lr": lambda c: c.clip_finetune_lr,
    "pg_best_variant": lambda c: c.pg_best_variant,
}


def protocol(run: StudyRun) -> dict[str, Any]:
    """The ``protocol`` entry of ``results.json``."""
    cfg = run.cfg
    return {"locked_split": "test",
            "reads": {phase: dict(sorted(counts.items())) for phase, counts in run.reads.items()},
            "reads_unrecorded": sorted(run.unrecorded),  # stages cached before stamps kept their reads
            "choices": {name: {"value": value(cfg), "chosen_on": cfg.protocol.get(name, "not recorded")}
                        for name, value in CHOICES.items()}}
