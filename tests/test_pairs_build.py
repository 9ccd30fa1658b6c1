"""build-pairs on the phantom set: schema, the Hub-style layout, consumers, report, world-size independence."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pairs_common import KINDS, build_reference, make_builder, rows

datasets = pytest.importorskip("datasets")

FAST = dict(generator="tiny", k=2, steps=2, clip="tiny", batch_items=2, chunk_size=2, progress=False)


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
    """One loaded Builder (test split, no CLIP judge) reused by the rank tests."""
    return make_builder(phantom_dir, tmp_path_factory.mktemp("unused"), FAST)


@pytest.fixture(scope="module")
def reference(builder, tmp_path_factory):
    """Uninterrupted single-process build of the builder's config."""
    return build_reference(builder, tmp_path_factory.mktemp("ref"))


def test_schema_and_dtypes(built):
    from negdpo.preference.pairs.schema import SPLITS, features_for

    out, summary = built
    for kind in KINDS:
        dsd = datasets.load_from_disk(str(out / kind))
        assert set(dsd) <= set(SPLITS) and len(dsd) >= 2
        for ds in dsd.values():
            assert ds.features == features_for(kind), kind
            assert set(ds["kind"]) <= {kind}
    gen = datasets.load_from_disk(str(out / "generator"))
    assert "validation" in gen and set(gen["validation"]["split"]) == {"validation"}
    row = gen["train"][0]
    for col in ("source", "mask", "chosen", "rejected"):
        assert row[col].mode == "L" and row[col].size == (64, 64)
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert row["score_chosen"] > row["score_rejected"] and 0 < row["difficulty"] <= 1
    assert row["seed_chosen"] >= 0 and row["gen_model"] == "tiny" and row["steps"] == 2
    assert json.loads(row["judge_chosen"]).keys() >= {"clip_lesion", "contrast", "mi_out", "twin"}
    i2t = datasets.load_from_disk(str(out / "clip_i2t"))["train"]
    assert isinstance(i2t[0]["chosen"], str) and i2t[0]["image"].mode == "L"
    assert summary["dropped"].get("not_positive", 0) > 0  # healthy subjects are counted, not silent
    assert summary["failed"] == [] and summary["settings"]["k"] == 2


def test_hub_layout_load_dataset_equals_load_from_disk(built):
    """``load_dataset(OUT, kind)`` through the card's configs returns the rows of ``load_from_disk(OUT/kind)``."""
    import yaml

    out, summary = built
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert [c["config_name"] for c in header["configs"]] == list(KINDS) and header["configs"][0]["default"]
    for kind in KINDS:
        hub = datasets.load_dataset(str(out), kind, cache_dir=str(out.parent / f"hf_cache_{kind}"))
        disk = datasets.load_from_disk(str(out / kind))
        assert set(hub) == set(disk) and {s: len(d) for s, d in disk.items()} == summary["rows"][kind]
        for split in disk:
            assert hub[split].features == disk[split].features
            a = hub[split].sort("pair_id").flatten_indices().data.table.to_pylist()
            assert a == disk[split].data.table.to_pylist(), (kind, split)
        counts = summary["rows"][kind]
        assert f"| {kind} | {counts.get('train', 0)} | {counts.get('validation', 0)} | {counts.get('test', 0)} |" in card
    default = datasets.load_dataset(str(out), cache_dir=str(out.parent / "hf_cache_default"))
    assert {s: len(d) for s, d in default.items()} == summary["rows"]["generator"]
    assert "clip\\_lesion:tiny=1" in card and "source inpaint: tiny" in card and '"k": 2' in card


def test_subject_level_split(built, phantom_dir):
    from negdpo.core.scans import split_matches

    out, _ = built
    meta = {r["file"]: r for r in csv.DictReader(open(phantom_dir / "meta.csv"))}
    where: dict[str, set] = {}
    for kind in ("generator", "clip_i2t"):
        for pid, r in rows(out, kind).items():
            where.setdefault(r["subject_id"], set()).add(r["split"])
            assert split_matches(meta[Path(r["file"]).name]["split"], r["split"]), pid
    assert where and all(len(v) == 1 for v in where.values())


def test_consumers_read_the_pairs(built, phantom_dir):
    """The generator and CLIP readers and the Pick-a-Pic converter read OUT; `val` = `validation`
    for pair datasets and scan folders alike."""
    from negdpo.generator.data import load_hf_pairs, load_pairs
    from negdpo.preference.clip.data import load_pairs as load_clip_pairs
    from negdpo.preference.clip.data import pairs_from_dataset
    from negdpo.preference.pairs.pickapic import to_pickapic

    out, summary = built
    pairs = load_hf_pairs(out, "train", 64)
    assert len(pairs) == summary["rows"]["generator"]["train"]
    assert pairs[0].chosen.shape == (64, 64, 3) and pairs[0].mask.any()
    val = [p.name for p in load_hf_pairs(out, "val", 64)]
    assert val == [p.name for p in load_hf_pairs(out, "validation", 64)]
    assert len(val) == summary["rows"]["generator"]["validation"] and all("#gen:" in n for n in val)
    clip_pairs = pairs_from_dataset(out, "train")
    assert len(clip_pairs) == summary["rows"]["clip_t2i"]["train"]
    assert clip_pairs[0].text_pos != clip_pairs[0].text_neg
    assert [p.pair_id for p in pairs_from_dataset(out, "val")] == \
        [p.pair_id for p in pairs_from_dataset(out, "validation")]
    scan_val = [p.name for p in load_pairs(phantom_dir, "val", 64)]
    assert scan_val and scan_val == [p.name for p in load_pairs(phantom_dir, "validation", 64)]
    assert [p.pair_id for p in load_clip_pairs(phantom_dir, "validation")] == \
        [p.pair_id for p in load_clip_pairs(phantom_dir, "val")]
    pp = to_pickapic(datasets.load_from_disk(str(out / "generator"))["validation"])
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
    assert info["rows"]["generator"] == summary["rows"]["generator"]


def test_report_and_card_escape_user_text(built, tmp_path):
    """Prompts, file names and model names reach report.md / README.md escaped (no raw HTML)."""
    from negdpo.preference.pairs.card import md_escape, write_card
    from negdpo.preference.pairs.report import write_report

    src, summary = built
    out = tmp_path / "esc"
    out.mkdir()
    evil = "<script>alert(1)</script> | *x*"
    dsd = datasets.load_from_disk(str(src / "generator"))
    dsd.map(lambda r: {"prompt": evil, "gen_model": evil}).save_to_disk(str(out / "generator"))
    (out / "build_summary.json").write_text(json.dumps(
        {"dropped": {evil: 1}, "skipped_files": [{"file": "x", "reason": f"{evil}.png: unreadable"}],
         "failed": [{"item": f"test/{evil}", "reason": "failed_generation:inpaint"}]}))
    md = write_report(out).read_text()
    card = write_card(out, {"generator": evil}, summary["rows"], evil, {"inpaint": evil}, {evil: 1}).read_text()
    for text in (md, card):
        assert "<script>" not in text and "&lt;script&gt;" in text
    assert md.count("&lt;script&gt;alert") >= 5 and "\\|" in md_escape(evil)  # table cells cannot split


def test_one_vs_two_ranks_identical(builder, reference, tmp_path):
    two = tmp_path / "two"
    builder.use_out(two)
    plan = builder.plan()  # every rank lists before any writes (run_build has a barrier there)
    builder.run_worker(1, 2, plan=plan)  # ranks in any order
    builder.run_worker(0, 2, plan=plan)
    builder.merge()
    a, b = rows(reference), rows(two)
    assert a and a.keys() == b.keys()
    for pid in a:
        assert a[pid] == b[pid], pid
    assert rows(reference, "clip_i2t") == rows(two, "clip_i2t")


def test_corrupt_image_reported_and_skipped(phantom_dir, tmp_path, builder):
    from negdpo.preference.pairs.build import BuildConfig, Builder
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    positives = sorted(p.name for p in (data / "val_masks").glob("*.png") if np.asarray(Image.open(p)).any())
    bad = data / "val_images" / positives[0]
    bad.write_bytes(b"not a png at all")
    cfg = BuildConfig(data=str(data), out=str(tmp_path / "out"), splits="val", judges="contrast,twin", **FAST)
    b = Builder(cfg, device="cpu")
    b.pipe = builder.pipe  # reuse the loaded generator
    res = b.run_worker(0, 1)
    b.merge()
    assert [f for f, _ in res.skipped] and any(positives[0] in why for _, why in res.skipped)
    ids = {pid.split("#")[0] for pid in rows(tmp_path / "out")}
    assert f"val/{Path(positives[0]).stem}" not in ids
    assert {f"val/{Path(p).stem}" for p in positives[1:]} <= ids
    again = b.run_worker(0, 1)  # not marked done: reported again, the others are not redone
    assert again.items == 1 and any(positives[0] in why for _, why in again.skipped)


def test_positive_as_rejected_with_exact_arrays(phantom_dir, tmp_path, builder):
    from negdpo.preference.pairs.build import BuildConfig, Builder

    cfg = BuildConfig(data=str(phantom_dir), out=str(tmp_path / "out"), splits="test", judges="contrast",
                      rejected="positive", store_arrays=True, kinds="generator", **(FAST | {"k": 1}))
    b = Builder(cfg, device="cpu")
    b.pipe = builder.pipe
    b.run_worker(0, 1)
    b.merge()
    ds = datasets.load_from_disk(str(tmp_path / "out" / "generator"))["test"]
    assert len(ds) >= 1 and set(ds["seed_rejected"]) == {-1}
    r = ds.with_format("numpy")[0]
    assert r["source_f32"].dtype == np.float32 and r["source_f32"].shape == (64, 64)
    np.testing.assert_array_equal(r["rejected_f32"], r["source_f32"])
