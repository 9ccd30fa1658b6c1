"""build-pairs on the phantom set: schema, round-trips, world-size independence, resume, corrupt input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

FAST = dict(generator="tiny", k=2, steps=2, clip="tiny", batch_items=2, chunk_size=2, progress=False)
NO_CLIP = "contrast=1,mi_out=0.5,fidelity_out=0.5,twin=2"


@pytest.fixture(scope="module")
def built(phantom_dir, tmp_path_factory):
    """A full build (all splits, all kinds, default judges incl. CLIP) through run_build."""
    from negdpo.preference.pairs.build import BuildConfig, run_build

    out = tmp_path_factory.mktemp("pairs_full")
    cfg = BuildConfig(data=str(phantom_dir), out=str(out), limit=3, **(FAST | {"chunk_size": 4}))
    summary = run_build(cfg)
    return out, summary


@pytest.fixture(scope="module")
def builder(phantom_dir, tmp_path_factory):
    """One loaded Builder (test split, no CLIP judge) reused by the rank / resume tests."""
    from negdpo.preference.pairs.build import BuildConfig, Builder

    cfg = BuildConfig(data=str(phantom_dir), out=str(tmp_path_factory.mktemp("unused")), splits="test",
                      judges=NO_CLIP, **FAST)
    return Builder(cfg, device="cpu")


@pytest.fixture(scope="module")
def reference(builder, tmp_path_factory):
    """Uninterrupted single-process build of the builder's config."""
    out = tmp_path_factory.mktemp("ref")
    builder.use_out(out).run_worker(0, 1)
    builder.merge()
    return out


def _rows(out: Path, kind: str = "generator") -> dict[str, dict]:
    from negdpo.preference.pairs.schema import dataset_dir

    dsd = datasets.load_from_disk(dataset_dir(str(out), kind))
    rows = {}
    for ds in dsd.values():
        for r in ds.data.table.to_pylist():  # raw rows: image bytes, exact floats
            rows[r["pair_id"]] = r
    return rows


def test_schema_and_dtypes(built):
    from negdpo.preference.pairs.schema import features_for

    out, summary = built
    for kind in ("generator", "clip_t2i", "clip_i2t"):
        dsd = datasets.load_from_disk(str(out / "dataset") if kind == "generator" else str(out / kind / "dataset"))
        assert set(dsd) <= {"train", "val", "test"} and len(dsd) >= 2
        for ds in dsd.values():
            assert ds.features == features_for(kind), kind
            assert set(ds["kind"]) <= {kind}
    gen = datasets.load_from_disk(str(out / "dataset"))["train"]
    row = gen[0]
    for col in ("source", "mask", "chosen", "rejected"):
        assert row[col].mode == "L" and row[col].size == (64, 64)
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert row["score_chosen"] > row["score_rejected"] and 0 < row["difficulty"] <= 1
    assert row["seed_chosen"] >= 0 and row["gen_model"] == "tiny" and row["steps"] == 2
    assert json.loads(row["judge_chosen"]).keys() >= {"clip_lesion", "contrast", "mi_out", "twin"}
    i2t = datasets.load_from_disk(str(out / "clip_i2t" / "dataset"))["train"]
    assert isinstance(i2t[0]["chosen"], str) and i2t[0]["image"].mode == "L"
    assert summary["dropped"].get("not_positive", 0) > 0  # healthy subjects are counted, not silent


def test_parquet_and_disk_round_trip(built):
    out, _ = built
    disk = datasets.load_from_disk(str(out / "dataset"))
    files = {s: sorted(str(p) for p in (out / "data").glob(f"{s}-*.parquet")) for s in disk}
    pq = datasets.load_dataset("parquet", data_files=files, cache_dir=str(out / ".cache_test"))
    for split in disk:
        a = disk[split].sort("pair_id").flatten_indices().data.table.to_pylist()
        b = pq[split].sort("pair_id").flatten_indices().data.table.to_pylist()
        assert pq[split].features == disk[split].features
        assert a == b


def test_subject_level_split(built, phantom_dir):
    import csv

    out, _ = built
    meta = {r["file"]: r for r in csv.DictReader(open(phantom_dir / "meta.csv"))}
    where: dict[str, set] = {}
    for kind in ("generator", "clip_i2t"):
        for pid, r in _rows(out, kind).items():
            where.setdefault(r["subject_id"], set()).add(r["split"])
            assert meta[Path(r["file"]).name]["split"] == r["split"], pid
    assert where and all(len(v) == 1 for v in where.values())


def test_consumers_read_the_pairs(built):
    """The generator training loop's loader and the Pick-a-Pic converter read OUT directly."""
    from negdpo.generator.data import load_hf_pairs
    from negdpo.preference.pairs.pickapic import to_pickapic

    out, _ = built
    pairs = load_hf_pairs(out, "train", 64)
    assert pairs and pairs[0].chosen.shape == (64, 64, 3) and pairs[0].mask.any()
    from negdpo.preference.clip.data import pairs_from_dataset

    clip_pairs = pairs_from_dataset(out, "train")
    assert clip_pairs and clip_pairs[0].text_pos != clip_pairs[0].text_neg
    pp = to_pickapic(datasets.load_from_disk(str(out / "dataset"))["val"])
    r = pp[0]
    assert r["label_0"] == 1.0 and r["jpg_0"][:2] == b"\xff\xd8" and r["caption"]


def test_report_written(built):
    out, summary = built
    rep = out / "report"
    for name in ("report.md", "report.json", "scores.png", "pairs_grid.png"):
        assert (rep / name).is_file(), name
    info = json.loads((rep / "report.json").read_text())
    twin = info["by_gen_model"]["tiny"]["twin_error"]
    assert twin["n"] > 0 and twin["chosen_out"] == 0.0  # paste-back keeps the outside exact


def test_one_vs_two_ranks_identical(builder, reference, tmp_path):
    two = tmp_path / "two"
    builder.use_out(two)
    plan = builder.plan()  # every rank lists before any writes (run_build has a barrier there)
    builder.run_worker(1, 2, plan=plan)  # ranks in any order
    builder.run_worker(0, 2, plan=plan)
    builder.merge()
    a, b = _rows(reference), _rows(two)
    assert a and a.keys() == b.keys()
    for pid in a:
        assert a[pid] == b[pid], pid
    assert _rows(reference, "clip_i2t") == _rows(two, "clip_i2t")


def test_interrupted_build_resumes_without_duplicates(builder, reference, tmp_path):
    """First run stops after one chunk with a half-written temp file left behind; rerun completes."""
    out = tmp_path / "resume"
    builder.use_out(out)
    builder.run_worker(0, 1, max_chunks=1)
    stray = out / "data" / ".test-deadbeef.parquet.tmp-0-1"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"PAR1 truncated")  # a writer killed mid-write
    done_before = {p.name for p in (out / "data").glob("*.parquet")}
    res = builder.run_worker(0, 1)
    assert res.items > 0 and done_before <= {p.name for p in (out / "data").glob("*.parquet")}
    builder.merge()
    assert not stray.exists()
    for kind in ("generator", "clip_t2i", "clip_i2t"):
        ids = [pid for d in datasets.load_from_disk(str(out / "dataset") if kind == "generator" else
                                                     str(out / kind / "dataset")).values() for pid in d["pair_id"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == set(_rows(reference, kind)), kind
    assert builder.run_worker(0, 1).items == 0  # nothing left


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_process_rerun_same_pair_ids(phantom_dir, reference, builder, tmp_path):
    """A real ``negdpo build-pairs`` process killed with SIGKILL after its first shard, then rerun."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "negdpo.preference.pairs.build_cli", "--data", str(phantom_dir), "--out", str(out),
            "--splits", "test", "--judges", NO_CLIP, "--k", "2", "--steps", "2", "--batch-items", "1",
            "--chunk-size", "1", "--no-progress", "--no-report"]  # one scan per shard: many shards to kill between
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not any((out / "data").glob("*.parquet")):
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert builder.use_out(out).run_worker(0, 1).items > 0
    builder.merge()
    ids = [pid for d in datasets.load_from_disk(str(out / "dataset")).values() for pid in d["pair_id"]]
    assert len(ids) == len(set(ids)) and set(ids) == set(_rows(reference))


def test_corrupt_image_reported_and_skipped(phantom_dir, tmp_path, builder):
    from negdpo.preference.pairs.build import BuildConfig, Builder

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    positives = sorted(p.name for p in (data / "val_masks").glob("*.png") if np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(p)).any())
    bad = data / "val_images" / positives[0]
    bad.write_bytes(b"not a png at all")
    cfg = BuildConfig(data=str(data), out=str(tmp_path / "out"), splits="val", judges="contrast,twin", **FAST)
    b = Builder(cfg, device="cpu")
    b._pipe = builder.pipe  # reuse the loaded generator
    res = b.run_worker(0, 1)
    b.merge()
    assert [f for f, _ in res.skipped] and any(positives[0] in why for _, why in res.skipped)
    ids = {pid.split("#")[0] for pid in _rows(tmp_path / "out")}
    assert f"val/{Path(positives[0]).stem}" not in ids
    assert {f"val/{Path(p).stem}" for p in positives[1:]} <= ids
    again = b.run_worker(0, 1)  # not marked done: reported again, the others are not redone
    assert again.items == 1 and any(positives[0] in why for _, why in again.skipped)


def test_positive_as_rejected_with_exact_arrays(phantom_dir, tmp_path, builder):
    from negdpo.preference.pairs.build import BuildConfig, Builder

    cfg = BuildConfig(data=str(phantom_dir), out=str(tmp_path / "out"), splits="test", judges="contrast",
                      rejected="positive", store_arrays=True, kinds="generator", **(FAST | {"k": 1}))
    b = Builder(cfg, device="cpu")
    b._pipe = builder.pipe
    b.run_worker(0, 1)
    b.merge()
    ds = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))["test"]
    assert len(ds) >= 1 and set(ds["seed_rejected"]) == {-1}
    r = ds.with_format("numpy")[0]
    assert r["source_f32"].dtype == np.float32 and r["source_f32"].shape == (64, 64)
    np.testing.assert_array_equal(r["rejected_f32"], r["source_f32"])
