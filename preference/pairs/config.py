"""Settings of a pair build: ``BuildConfig``, its up-front validation, and the subset that shapes the rows.

Importing this module does not import torch (``negdpo build-pairs --help`` stays fast).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from negdpo.core.fill import INITS
from negdpo.core.window import DOWNSCALE_HELP, MAX_SIDE, MAX_SIDE_HELP, PRESET_HELP, WINDOW_HELP

from .schema import KINDS

SOURCES = ("inpaint", "boundary")
REJECTED = ("worst", "positive")
GEN_PROMPTS = ("source", "healthy")
DTYPES = ("float32", "float16", "bfloat16")
FLAGS = {"steps": "sample_steps"}  # field -> its command-line flag where the two differ (``--steps`` is deprecated)
# Settings that do not change any row: resuming with other values is allowed.
NOT_ROW_SETTINGS = frozenset({"data", "out", "splits", "limit", "chunk_size", "batch_items", "kinds", "device",
                              "threads", "progress"})


@dataclass
class BuildConfig:
    data: str = field(metadata={"help": "scan folder (MedCLIP-SAMv2 layout; phantoms work)"})
    out: str = field(metadata={"help": "output folder (resumable)"})
    generator: str = field(
        default="tiny", metadata={"help": "inpainting generator: tiny | hub id | local diffusers folder"})
    adapter: str | None = field(
        default=None, metadata={"help": "LoRA folder (gen_train output) loaded into the generator (default: none)"})
    k: int = field(
        default=4, metadata={"help": "candidates per positive and source (>= 2 with --rejected worst)"})
    steps: int = field(
        default=20, metadata={"help": "sampling (denoising) steps of the generator per candidate"})
    guidance: float = field(
        default=1.0, metadata={"help": "classifier-free guidance scale of the generator (1 = off)"})
    strength: float = field(
        default=1.0, metadata={"help": "1 = sample from pure noise; < 1 = from the noised --init image"})
    init: str = field(
        default="source", metadata={"help": "what a strength < 1 starts from: source (the positive) | harmonic (its harmonic fill)"})
    scheduler: str | None = field(
        default=None, metadata={"help": "sampling scheduler name (default: the generator's own)"})
    size: int | None = field(
        default=None, metadata={"help": "model resolution in px, a multiple of 8 (default: the generator's native)"})
    dilate: int = field(
        default=2, metadata={"help": "px added to the lesion mask before repainting (stored as `mask`)"})
    seed: int = field(
        default=0, metadata={"help": "base seed; each candidate's seed derives from it and the scan's name"})
    judges: str = field(
        default="clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2", metadata={"help": "judge mix name=weight,... (negdpo.preference.pairs.judges) that ranks the candidates"})
    clip: str = field(
        default="tiny", metadata={"help": "CLIP of the clip_lesion judge and of the latent-boundary negatives: tiny | hf-hub:<id> | local-dir:<folder>"})
    sources: str = field(
        default="inpaint", metadata={"help": "comma list of candidate sources: inpaint (generator fills) and/or boundary (latent-boundary negatives)"})
    rejected: str = field(
        default="worst", metadata={"help": "rejected image of a generator pair: worst (worst-scoring fill) | positive (the positive itself)"})
    kinds: str = field(
        default="generator,clip_t2i,clip_i2t", metadata={"help": "comma list of pair datasets to write: generator, clip_t2i, clip_i2t"})
    gen_prompt: str = field(
        default="source", metadata={"help": "text the generator is conditioned on: source (the scan's prompt) | healthy (the healthy text)"})
    healthy_text: str | None = field(
        default=None, metadata={"help": "healthy (tumour-free) text of the pairs (default: from prompts of healthy scans per modality)"})
    splits: str | None = field(
        default=None, metadata={"help": "comma list of folder splits to build (default: all present)"})
    limit: int | None = field(
        default=None, metadata={"help": "at most this many scans per split (smoke runs; default: all)"})
    chunk_size: int = field(default=16, metadata={"help": "scans per parquet shard"})
    batch_items: int = field(default=1, metadata={"help": "scans per generator call"})
    tie_eps: float = field(
        default=1e-4, metadata={"help": "judge scores closer than this are a tie and give no pair"})
    store_arrays: bool = field(
        default=False, metadata={"help": "also store the exact float32 intensities as array columns (grayscale scans of one size only)"})
    subject_pattern: str | None = field(
        default=None, metadata={"help": "regex on the file stem whose group 1 is the subject id (keeps a subject's scans together)"})
    resplit: bool = field(
        default=False, metadata={"help": "reassign splits by a hash of the subject instead of keeping the folder's splits"})
    boundary_steps: int = field(
        default=20, metadata={"help": "optimisation steps of a latent-boundary negative (--sources boundary)"})
    boundary_eps: float = field(
        default=0.5, metadata={"help": "largest RMS of a latent-boundary change, relative to the lesion latent's RMS (--sources boundary)"})
    device: str = field(
        default="auto", metadata={"help": "torch device: auto (cuda when available) | cpu | cuda[:N]"})
    dtype: str = field(
        default="float32", metadata={"help": "generator weights' dtype: float32 | float16 | bfloat16"})
    # reading scans: negdpo.core.window.ScanReading (the same four fields)
    window: str | None = field(default=None, metadata={"help": WINDOW_HELP})
    window_preset: str | None = field(default=None, metadata={"help": PRESET_HELP})
    max_side: int = field(default=MAX_SIDE, metadata={"help": MAX_SIDE_HELP})
    downscale: bool = field(default=False, metadata={"help": DOWNSCALE_HELP})
    threads: int | None = field(
        default=None, metadata={"help": "torch threads per process; pin it (e.g. 1) for CPU runs bit-identical across world sizes"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no_progress hides it)"})

    def kind_list(self) -> list[str]:
        return choices(self.kinds, KINDS, "--kinds")

    def source_list(self) -> list[str]:
        return choices(self.sources, SOURCES, "--sources")

    def validate(self) -> BuildConfig:
        """Raise ``ValueError`` with a one-line message naming the flag for the first bad setting."""
        def need(ok: bool, flag: str, rule: str, value: object) -> None:
            if not ok:
                raise ValueError(f"--{FLAGS.get(flag, flag)} must be {rule} (got {value!r})")

        for name in ("k", "steps", "boundary_steps", "chunk_size", "batch_items"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, name, "an integer >= 1", v)
        for name in ("limit", "threads", "size"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), name, "an integer >= 1", v)
        if self.size is not None:
            need(self.size % 8 == 0, "size", "a multiple of 8 (the autoencoder's downsampling)", self.size)
        need(isinstance(self.dilate, int) and self.dilate >= 0, "dilate", "an integer >= 0", self.dilate)
        need(self.guidance >= 0, "guidance", ">= 0", self.guidance)
        need(0 < self.strength <= 1, "strength", "in (0, 1]", self.strength)
        need(self.init in INITS, "init", f"one of {INITS}", self.init)
        need(self.tie_eps >= 0, "tie_eps", ">= 0", self.tie_eps)
        need(self.boundary_eps > 0, "boundary_eps", "> 0", self.boundary_eps)
        need(self.rejected in REJECTED, "rejected", f"one of {REJECTED}", self.rejected)
        need(self.gen_prompt in GEN_PROMPTS, "gen_prompt", f"one of {GEN_PROMPTS}", self.gen_prompt)
        need(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        if self.rejected == "worst":
            need(self.k >= 2, "k", ">= 2 with --rejected worst (or use --rejected positive)", self.k)
        self.kind_list()
        self.source_list()
        from negdpo.core.window import reading_options

        reading_options(self)  # a bad --window / --window_preset / --max_side names the flag
        from .judges import parse_spec  # here: keeps --help free of torch

        try:
            parse_spec(self.judges)
        except ValueError as err:
            raise ValueError(f"--judges: {err}") from None
        need(bool(self.data) and Path(self.data).is_dir(), "data", "an existing scan folder", self.data)
        need(bool(self.out), "out", "an output folder", self.out)
        return self


def choices(value: str, allowed: Iterable[str], flag: str) -> list[str]:
    """Comma list -> items, each one of ``allowed`` (at least one)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = sorted(set(items) - set(allowed))
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad}; choose from {tuple(allowed)}")
    return items


def row_settings(cfg: BuildConfig, adapter_sha: str = "") -> dict:
    """The settings that shape the rows (a resume with other ones would mix rows), JSON-ready."""
    out = {k: v for k, v in asdict(cfg).items() if k not in NOT_ROW_SETTINGS}
    out["sources"] = ",".join(cfg.source_list())
    out["adapter_sha"] = adapter_sha
    return out


def settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(old: dict, new: dict) -> list[str]:
    """``--flag: old -> new`` for every differing setting."""
    keys = sorted(set(old) | set(new))
    return [f"--{FLAGS.get(k, k)}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def config_fields() -> list[str]:
    return [f.name for f in fields(BuildConfig)]
