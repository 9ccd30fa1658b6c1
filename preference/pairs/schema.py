"""Column layout and folder layout of the preference-pair datasets (TRL names where they exist).

Three kinds, each one config of the output (a Hub-style dataset repo, see ``docs/method.md#pairs``)
because their ``chosen``/``rejected`` types differ; every row also carries ``kind``:

* ``generator``: ``source`` + ``mask`` condition an inpainting generator; ``chosen`` is the better
  tumour-free fill, ``rejected`` the worse fill (or the positive itself).
* ``clip_t2i``: same columns; ``prompt`` = the positive's lesion text, ``chosen`` = the real positive,
  ``rejected`` = its generated negative.
* ``clip_i2t``: ``image`` with ``chosen`` / ``rejected`` *texts* (a positive with its lesion text over
  the healthy text, a generated negative the other way round).

Layout of a build folder ``OUT``::

    OUT/README.md                          dataset card: one ``configs:`` entry per kind (data_files)
    OUT/data/<kind>/<split>-<hash>.parquet  shards; ``load_dataset(OUT, kind)``
    OUT/<kind>/                             the same rows as a DatasetDict; ``load_from_disk(OUT/<kind>)``

Dataset splits are ``train`` / ``validation`` / ``test`` (the scan folder's ``val_images`` is the
``validation`` split); readers accept ``val`` for ``validation`` (``negdpo.core.scans.SPLIT_ALIASES``).

Images are ``datasets.Image`` (8-bit PNG: mode L for grayscale, RGB otherwise); ``mask`` is L 0/255
with 255 = repaint, the dilation actually used. Exact float intensities are optional
(``source_f32``/``chosen_f32``/``rejected_f32`` as ``Array2D``, fixed shape per build).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Array2D, Features, Image, Value

KINDS = ("generator", "clip_t2i", "clip_i2t")
KIND_GENERATOR, KIND_T2I, KIND_I2T = KINDS
SPLITS = ("train", "validation", "test")

# column names shared with the readers (negdpo.preference.clip.data)
PAIR_ID, PROMPT, KIND, SPLIT, FILE, MODALITY = "pair_id", "prompt", "kind", "split", "file", "modality"
CHOSEN, REJECTED, SOURCE, MASK, IMAGE = "chosen", "rejected", "source", "mask", "image"
IMAGE_IS_REAL = "image_is_real"
NEGATIVE_PROMPT, REF_SIMS = "negative_prompt", "ref_sims"  # optional CLIP t2i columns (clip.data writes them)

_PROVENANCE = {
    "subject_id": Value("string"),
    "split": Value("string"),
    "modality": Value("string"),
    "file": Value("string"),  # source file relative to the scan folder, e.g. train_images/x.png
    "gen_model": Value("string"),
    "gen_adapter_sha": Value("string"),
    "scheduler": Value("string"),
    "steps": Value("int32"),
    "guidance": Value("float32"),
    "strength": Value("float32"),
    "seed_chosen": Value("int64"),  # -1 = not generated (a real image)
    "seed_rejected": Value("int64"),
    "label_source": Value("string"),  # judge spec that produced the scores
    "code_version": Value("string"),
    "kind": Value("string"),
}

PAIR_FEATURES = Features({
    "pair_id": Value("string"),
    "prompt": Value("string"),
    "source": Image(),
    "mask": Image(),
    "chosen": Image(),
    "rejected": Image(),
    "score_chosen": Value("float32"),
    "score_rejected": Value("float32"),
    "difficulty": Value("float32"),  # in (0, 1]; 1 = tie (hardest), from the score margin
    "difficulty_bucket": Value("int32"),  # 0 easy .. N_BUCKETS-1 hard (fixed thresholds)
    "judge_chosen": Value("string"),  # JSON {judge name: score}
    "judge_rejected": Value("string"),
    **_PROVENANCE,
})

I2T_FEATURES = Features({
    "pair_id": Value("string"),
    "image": Image(),
    "mask": Image(),
    "prompt": Value("string"),  # the neutral question the texts answer (template)
    "chosen": Value("string"),
    "rejected": Value("string"),
    "score_chosen": Value("float32"),
    "score_rejected": Value("float32"),
    "difficulty": Value("float32"),
    "difficulty_bucket": Value("int32"),
    "image_is_real": Value("bool"),
    **_PROVENANCE,
})

FLOAT_COLUMNS = {"generator": ("source_f32", "chosen_f32", "rejected_f32"),
                 "clip_t2i": ("source_f32", "chosen_f32", "rejected_f32"),
                 "clip_i2t": ("image_f32",)}

DIFFICULTY_TAU = 0.05  # margin scale: difficulty = 1 / (1 + margin / tau)
BUCKET_EDGES = (0.2, 0.5)  # difficulty < 0.2 easy, < 0.5 medium, else hard
N_BUCKETS = len(BUCKET_EDGES) + 1


def features_for(kind: str, float_shape: tuple[int, ...] | None = None) -> Features:
    """Features of one kind; ``float_shape`` (H, W) adds the exact float32 intensity columns."""
    if kind not in KINDS:
        raise ValueError(f"unknown pair kind '{kind}'; expected one of {KINDS}")
    feats = Features(dict(I2T_FEATURES if kind == "clip_i2t" else PAIR_FEATURES))
    if float_shape is not None:
        if len(float_shape) != 2:
            raise ValueError(f"exact float arrays are stored for grayscale (H, W) scans only, got {float_shape}")
        for col in FLOAT_COLUMNS[kind]:
            feats[col] = Array2D(shape=tuple(float_shape), dtype="float32")
    return feats


def difficulty_of(margin: float) -> tuple[float, int]:
    """(difficulty in (0, 1], bucket) from a non-negative score margin."""
    d = 1.0 / (1.0 + max(float(margin), 0.0) / DIFFICULTY_TAU)
    bucket = sum(d >= e for e in BUCKET_EDGES)
    return d, int(bucket)


def dataset_dir(out: str | Path, kind: str) -> str:
    """Where ``save_to_disk`` puts a kind: ``OUT/<kind>``."""
    _check_kind(kind)
    return f"{out}/{kind}"


def shard_path(kind: str) -> str:
    """Parquet shards of a kind relative to the build folder: ``data/<kind>`` (the card's ``data_files``)."""
    _check_kind(kind)
    return f"data/{kind}"


def shard_dir(out: str | Path, kind: str) -> str:
    return f"{out}/{shard_path(kind)}"


def find_dataset(path: str | Path, kind: str) -> Path | None:
    """A kind's ``save_to_disk`` folder given a build folder or the folder itself (also the layout of
    builds before the Hub-style one: ``OUT/dataset``, ``OUT/<kind>/dataset``)."""
    p = Path(path)
    for cand in (Path(dataset_dir(p, kind)), p / kind / "dataset", p / "dataset" if kind == "generator" else None,
                 p):
        if cand is not None and ((cand / "dataset_dict.json").is_file() or (cand / "state.json").is_file()):
            return cand
    return None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown pair kind '{kind}'; expected one of {KINDS}")
