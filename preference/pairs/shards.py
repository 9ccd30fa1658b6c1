"""Parquet shards of a pair build: atomic writes, "done" bookkeeping, corrupt shards, merge to disk.

A shard is written to ``.<name>.tmp-<tag>`` and renamed into place; its parquet schema metadata
(``negdpo``) lists the items it completed, the items it dropped (with the reason) and the build's
settings hash, so "done" is exactly "in a renamed shard": a rerun skips those items and redoes the rest.
A chunk without rows writes only a JSON manifest (``OUT/.empty_chunks/<kind>/``; zero-row parquet
files break ``load_dataset``). A shard or manifest that cannot be read is named in a warning, set aside
as ``<name>.corrupt`` and its items are rebuilt by the run that found it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from negdpo.core.faults import fault_point

from .schema import dataset_dir, shard_dir

logger = logging.getLogger(__name__)
META_KEY = b"negdpo"


class CorruptShardError(RuntimeError):
    """Shards that could not be read; they were set aside and a rerun rebuilds their items."""


@dataclass
class ChunkIndex:
    """What the finished chunks of one kind hold."""

    metas: list[dict] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)  # corrupt files renamed to *.corrupt this time

    @property
    def items(self) -> set[str]:
        return {k for m in self.metas for k in m.get("items", [])}


def shard_files(out: str | Path, kind: str) -> list[Path]:
    d = Path(shard_dir(out, kind))
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def empty_dir(out: str | Path, kind: str) -> Path:
    """Manifests of chunks that produced no rows."""
    return Path(out) / ".empty_chunks" / kind


def set_aside(path: Path, why: str) -> str:
    """Rename an unreadable file to ``<name>.corrupt`` (``.corrupt-<n>`` if taken); returns the new name."""
    dest = path.with_name(path.name + ".corrupt")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.corrupt-{n}")
        n += 1
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another process set it aside first
        return str(dest)
    logger.warning("%s: unreadable (%s); set aside as %s, its scans are rebuilt", path, why, dest.name)
    return str(dest)


def read_shard_meta(path: Path) -> dict:
    """The ``negdpo`` metadata of a shard; raises ``ValueError`` naming the file if it is unreadable."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
        rows = pf.metadata.num_rows
    except Exception as err:  # truncated, not parquet, bad JSON
        raise ValueError(f"{path}: {type(err).__name__}: {err}") from None
    if "items" not in meta or meta.get("rows", rows) != rows:
        raise ValueError(f"{path}: metadata lists {meta.get('rows')} rows, the file holds {rows}")
    return meta


def chunk_index(out: str | Path, kind: str) -> ChunkIndex:
    """Metadata of every finished chunk of a kind (shards and empty-chunk manifests); corrupt ones are
    set aside (renamed), so their items count as not done."""
    idx = ChunkIndex()
    for p in shard_files(out, kind):
        try:
            idx.metas.append(read_shard_meta(p))
        except ValueError as err:
            idx.set_aside.append(set_aside(p, str(err).split(": ", 1)[-1]))
    d = empty_dir(out, kind)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            meta = json.loads(p.read_text())
            if "items" not in meta:
                raise ValueError("no 'items'")
            idx.metas.append(meta)
        except (ValueError, OSError) as err:
            idx.set_aside.append(set_aside(p, str(err)))
    return idx


def write_shard(path: Path, rows: list[dict], features, meta: dict, tag: str, empty_manifest: Path) -> None:
    """Atomic parquet write (tmp + rename) with the HF features and our metadata in the schema.

    A chunk without rows writes only its manifest (``empty_dir``), atomically as well.
    """
    import datasets
    import pyarrow.parquet as pq

    if not rows:
        empty_manifest.parent.mkdir(parents=True, exist_ok=True)
        tmp = empty_manifest.with_name(f".{empty_manifest.name}.tmp-{tag}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, empty_manifest)
        fault_point("shard_done")
        return

    columns = {name: [r[name] for r in rows] for name in features}
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(meta).encode()
    table = table.replace_schema_metadata(md)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    with pq.ParquetWriter(tmp, table.schema) as writer:
        writer.write_table(table)
        fault_point("shard_write")  # row data on disk, no footer yet
    os.replace(tmp, path)
    fault_point("shard_done")


def _load_kind(out: Path, kind: str, files: list[Path]):
    """DatasetDict of a kind's shards by split (file names start with the split), sorted by pair_id."""
    import datasets

    by_split: dict[str, list[str]] = defaultdict(list)
    for f in files:  # data_files are glob patterns: '[' or '*' in the folder's path must be literal
        by_split[f.name.split("-", 1)[0]].append(glob.escape(str(f)))
    cache = out / ".hf_cache"
    try:
        dsd = datasets.load_dataset("parquet", data_files=dict(by_split), cache_dir=str(cache))
        return datasets.DatasetDict({s: dsd[s].sort("pair_id") for s in sorted(dsd)})
    except Exception as err:
        import pyarrow.parquet as pq

        bad = []
        for f in files:
            try:
                pq.read_table(f)
            except Exception as e:  # data pages unreadable although the footer is fine
                bad.append(set_aside(f, f"{type(e).__name__}: {e}"))
        if not bad:
            raise
        raise CorruptShardError(f"{kind}: unreadable shard(s) set aside: {', '.join(bad)}; rerun the same "
                                "command to rebuild their scans") from err
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def merge_shards(out: str | Path, kinds: Iterable[str]) -> dict[str, dict[str, int]]:
    """Every kind's shards -> ``OUT/<kind>`` (DatasetDict by split, sorted by pair_id, save_to_disk)."""
    import datasets

    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    for kind in kinds:
        files = shard_files(out, kind)
        if not files:
            continue
        for tmp in Path(shard_dir(out, kind)).glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)  # leftovers of killed writers
        dsd = _load_kind(out, kind, files)
        for s, ds in dsd.items():
            ids = ds["pair_id"]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"{kind}/{s}: duplicate pair_ids in the shards of {out}")
        final = Path(dataset_dir(out, kind))
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dsd.save_to_disk(str(tmp))
        del dsd
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        fault_point("merge")  # the kind's dataset folder is missing until the rename below
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        counts[kind] = {s: len(d) for s, d in datasets.load_from_disk(str(final)).items()}
    return counts


def drop_reasons(metas: Iterable[dict]) -> dict[str, int]:
    """Drop reasons (before the ``:``) over chunk metadata, one count per reason per item."""
    c: Counter = Counter()
    for meta in metas:
        for reason in meta.get("dropped", {}).values():
            for r in reason.split(";"):
                c[r.split(":")[0]] += 1
    return dict(c)
