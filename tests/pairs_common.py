"""Shared by the build-pairs tests: judges without CLIP, the kinds, one loaded Builder, a reference build, rows."""

from __future__ import annotations

from pathlib import Path

import datasets

NO_CLIP = "contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"
KINDS = ("generator", "clip_t2i", "clip_i2t")


def make_builder(phantom_dir: Path, unused_out: Path, fast: dict):
    """One loaded Builder on the test split with the model-free judges (``fast``: the test file's settings)."""
    from negdpo.preference.pairs.build import BuildConfig, Builder

    cfg = BuildConfig(data=str(phantom_dir), out=str(unused_out), splits="test", judges=NO_CLIP, **fast)
    return Builder(cfg, device="cpu")


def build_reference(builder, out: Path) -> Path:
    """Uninterrupted single-process build of the builder's config into ``out``."""
    builder.use_out(out).run_worker(0, 1)
    builder.merge()
    return out


def rows(out: Path, kind: str = "generator") -> dict[str, dict]:
    """Rows of one kind by ``pair_id``, raw (image bytes, exact floats)."""
    dsd = datasets.load_from_disk(str(Path(out) / kind))
    return {r["pair_id"]: r for ds in dsd.values() for r in ds.data.table.to_pylist()}
