"""Settings of a pair build: ``BuildConfig``, its up-front validation, and the subset that shapes the rows.

Importing this module does not import torch (``negdpo build-pairs --help`` stays fast).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from negdpo.core.fill import INITS
from negdpo.core.window import MAX_SIDE

from .schema import KINDS

SOURCES = ("inpaint", "boundary")
REJECTED = ("worst", "positive")
GEN_PROMPTS = ("source", "healthy")
DTYPES = ("float32", "float16", "bfloat16")
# Settings that do not change any row: resuming with other values is allowed.
NOT_ROW_SETTINGS = frozenset({"data", "out", "splits", "limit", "chunk_size", "batch_items", "kinds", "device",
                              "threads", "progress"})


@dataclass
class BuildConfig:
    data: str
    out: str
    generator: str = "tiny"
    adapter: str | None = None
    k: int = 4  # candidates per positive and source
    steps: int = 20
    guidance: float = 1.0
    strength: float = 1.0
    init: str = "source"  # what a strength < 1 starts from: the positive | its harmonic fill
    scheduler: str | None = None
    size: int | None = None  # model resolution (default: the generator's native)
    dilate: int = 2  # px added to the lesion mask before repainting (stored as `mask`)
    seed: int = 0
    judges: str = "clip_lesion=1,contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"
    clip: str = "tiny"
    sources: str = "inpaint"  # comma list of: inpaint, boundary
    rejected: str = "worst"  # worst fill | the positive itself
    kinds: str = "generator,clip_t2i,clip_i2t"
    gen_prompt: str = "source"  # conditioning text: the scan's prompt | the healthy text
    healthy_text: str | None = None  # default: from prompts of healthy scans per modality
    splits: str | None = None  # comma list of folder splits; default all present
    limit: int | None = None  # at most this many scans per split (smoke runs)
    chunk_size: int = 16  # items per shard
    batch_items: int = 1  # items per generator call
    tie_eps: float = 1e-4
    store_arrays: bool = False
    subject_pattern: str | None = None  # regex on the file stem; group 1 = subject id
    resplit: bool = False
    boundary_steps: int = 20
    boundary_eps: float = 0.5
    device: str = "auto"
    dtype: str = "float32"
    window: str | None = None  # reading scans: negdpo.core.window.ScanReading (the same four fields)
    window_preset: str | None = None
    max_side: int = MAX_SIDE
    downscale: bool = False
    threads: int | None = None  # torch intra-op threads per process (pin it for CPU bit-reproducibility)
    progress: bool = True

    def kind_list(self) -> list[str]:
        return choices(self.kinds, KINDS, "--kinds")

    def source_list(self) -> list[str]:
        return choices(self.sources, SOURCES, "--sources")

    def validate(self) -> BuildConfig:
        """Raise ``ValueError`` with a one-line message naming the flag for the first bad setting."""
        def need(ok: bool, flag: str, rule: str, value: object) -> None:
            if not ok:
                raise ValueError(f"--{flag} must be {rule} (got {value!r})")

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
    return [f"--{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def config_fields() -> list[str]:
    return [f.name for f in fields(BuildConfig)]
