"""Phantom set: layout, determinism (same seed -> same bytes), twin/mask consistency, splits."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.phantoms import PhantomConfig, generate
from negdpo.core.scans import ScanFolder
from scipy import ndimage


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(PhantomConfig(out=str(tmp_path / "a"), n=6, size=48, seed=3))
    b = generate(PhantomConfig(out=str(tmp_path / "b"), n=6, size=48, seed=3))
    c = generate(PhantomConfig(out=str(tmp_path / "c"), n=6, size=48, seed=4))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_meta_prompts(phantom_dir):
    rows = list(csv.DictReader(open(phantom_dir / "meta.csv")))
    prompts = json.loads((phantom_dir / "prompts.json").read_text())
    assert {r["modality"] for r in rows} == {"mri", "us"}
    assert len(rows) == 24 and set(prompts) == {r["file"] for r in rows}
    for r in rows:
        for kind in ("images", "masks", "twins"):
            assert (phantom_dir / f"{r['split']}_{kind}" / r["file"]).exists()
    assert any(r["positive"] == "0" for r in rows) and any(r["positive"] == "1" for r in rows)
    healthy = [r["file"] for r in rows if r["positive"] == "0" and r["split"] == "train"]
    assert sorted(p.name for p in (phantom_dir / "negatives").iterdir()) == sorted(healthy)
    assert (phantom_dir / "preview.png").exists()
    # prompts mention a lesion exactly for positives
    for r in rows:
        said_none = "no tumour" in prompts[r["file"]] or "no mass" in prompts[r["file"]]
        assert said_none == (r["positive"] == "0")


def test_subject_level_splits(phantom_dir):
    rows = list(csv.DictReader(open(phantom_dir / "meta.csv")))
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}


def test_twin_equals_positive_outside_dilated_mask(phantom_dir):
    n_pos = 0
    folder = ScanFolder(phantom_dir)
    for split in ("train", "val", "test"):
        for scan in folder.load_split(split):
            assert scan.twin is not None
            if not scan.positive:
                assert np.array_equal(scan.image, scan.twin)  # healthy-only: its own twin
                continue
            n_pos += 1
            outside = ~ndimage.binary_dilation(scan.mask, iterations=2)
            assert np.array_equal(scan.image[outside], scan.twin[outside])
            # the lesion is visible: inside the mask the two differ
            assert np.abs(scan.image[scan.mask] - scan.twin[scan.mask]).mean() > 0.02
    assert n_pos >= 12


def test_lesions_vary(tmp_path):
    root = generate(PhantomConfig(out=str(tmp_path / "v"), n=20, size=64, seed=1, preview=False))
    rows = [r for r in csv.DictReader(open(root / "meta.csv")) if r["positive"] == "1"]
    areas = [int(r["lesion_area"]) for r in rows]
    contrasts = [float(r["lesion_contrast"]) for r in rows]
    xs = [float(r["lesion_cx"]) for r in rows]
    assert min(areas) > 0 and max(areas) > 2 * min(areas)
    assert np.std(contrasts) > 0.05 and np.std(xs) > 5


def test_rerun_never_leaves_old_images(tmp_path, capsys):
    from negdpo.cli import main as negdpo

    out = tmp_path / "ph"
    assert negdpo(["phantoms", "--out", str(out), "--n", "12", "--size", "32", "--no_preview"]) == 0
    (out / "notes.txt").write_text("mine")
    # other settings into the same folder: refused in one line, nothing touched
    assert negdpo(["phantoms", "--out", str(out), "--n", "3", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "--overwrite_output_dir" in err
    assert len(list((out / "train_images").iterdir())) > 3
    assert negdpo(["phantoms", "--out", str(out), "--n", "3", "--size", "32", "--overwrite_output_dir"]) == 0
    rows = list(csv.DictReader(open(out / "meta.csv")))
    listed = sorted(f"{s}/{p.name}" for s in ("train", "val", "test") for p in (out / f"{s}_images").glob("*.png"))
    assert listed == sorted(f"{r['split']}/{r['file']}" for r in rows) and len(rows) == 6
    assert (out / "notes.txt").read_text() == "mine"  # not the command's: kept
    assert not (out / "negatives").exists() or {p.name for p in (out / "negatives").iterdir()} <= {
        r["file"] for r in rows}
    # the same settings again: rewritten in place, same bytes
    before = _digest(out)
    assert negdpo(["phantoms", "--out", str(out), "--n", "3", "--size", "32"]) == 0
    assert _digest(out) == before


def test_cli_user_errors_one_line(tmp_path, capsys):
    from negdpo.cli import main as negdpo

    assert negdpo(["phantoms", "--out", str(tmp_path / "x"), "--n", "0", "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err == ("negdpo phantoms: error: phantoms: n=0: need at least 1 subject; size=8: need at least 16 px "
                   "(--debug for the traceback)\n")
    with pytest.raises(ValueError, match="need at least 1 subject"):
        negdpo(["phantoms", "--out", str(tmp_path / "x"), "--n", "0", "--debug"])
    # no abbreviations: --overwrite is not --overwrite_output_dir (one line, exit 2)
    assert negdpo(["phantoms", "--out", str(tmp_path / "x"), "--overwrite"]) == 2
    assert capsys.readouterr().err == ("negdpo phantoms: error: unrecognized arguments: --overwrite "
                                       "(--help for the options)\n")


def test_ensure_phantoms_replaces_other_settings_refuses_foreign_folder(tmp_path):
    from negdpo.core.outdir import OutputDirError
    from negdpo.core.phantoms import ensure_phantoms

    out = ensure_phantoms(tmp_path / "e", n=4, size=32, preview=False)
    stamp = (out / "meta.csv").stat().st_mtime_ns
    assert ensure_phantoms(out, n=4, size=32, preview=False) == out and (out / "meta.csv").stat().st_mtime_ns == stamp
    ensure_phantoms(out, n=3, size=32, preview=False)  # other settings: the old set is replaced, not topped up
    assert len(list(csv.DictReader(open(out / "meta.csv")))) == 6 == len(list(out.glob("*_images/*.png")))
    (tmp_path / "data" / "train_images").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="'train_images' was not written by negdpo"):
        ensure_phantoms(tmp_path / "data", n=2, size=32)


def test_pretrain_pool_is_disjoint_and_changes_no_eval_byte(tmp_path):
    """The pre-training pool adds its own subjects; train/val/test files stay byte-identical."""
    plain = generate(PhantomConfig(out=str(tmp_path / "a"), n=6, size=32, seed=2, preview=False))
    pooled = generate(PhantomConfig(out=str(tmp_path / "b"), n=6, size=32, seed=2, preview=False, pretrain_n=5))
    a, b = _digest(plain), _digest(pooled)
    assert {k: v for k, v in b.items() if not k.startswith("pretrain_") and k.endswith(".png")} == \
        {k: v for k, v in a.items() if k.endswith(".png")}
    rows = list(csv.DictReader(open(pooled / "meta.csv")))
    pre = {r["subject_id"] for r in rows if r["split"] == "pretrain"}
    others = {r["subject_id"] for r in rows if r["split"] != "pretrain"}
    assert len(pre) == 5 and not pre & others
    assert len(list((pooled / "pretrain_images").glob("*.png"))) == 10
    assert {r["split"] for r in rows} == {r["split"] for r in csv.DictReader(open(plain / "meta.csv"))} | {"pretrain"}
    assert not {p.name for p in (pooled / "negatives").iterdir()} & {r["file"] for r in rows if r["split"] == "pretrain"}
    # the pool's reports vary in wording (and still say what the image holds); the eval reports do not change
    prompts, before = (json.loads((d / "prompts.json").read_text()) for d in (pooled, plain))
    assert {k: v for k, v in prompts.items() if "_p" not in k} == before
    pool = [r for r in rows if r["split"] == "pretrain"]
    for r in pool:
        text = prompts[r["file"]].lower()
        assert (("no tumour" in text) or ("no mass" in text)) == (r["positive"] == "0")
        if r["group"].startswith("mri_"):
            assert r["group"].split("_")[1] in text  # bright / dark
    assert len({prompts[r["file"]].split(" ")[0] for r in pool}) >= 2
    folder = ScanFolder(pooled)
    assert folder.splits() == ScanFolder(plain).splits()  # readers of the three splits see what they saw before
    assert all(s.twin is not None for s in folder.load_split("pretrain"))


def test_lesion_groups_and_area_law(tmp_path):
    root = generate(PhantomConfig(out=str(tmp_path / "g"), n=40, size=64, seed=5, preview=False,
                                  lesion_area=(0.01, 0.15)))
    rows = list(csv.DictReader(open(root / "meta.csv")))
    prompts = json.loads((root / "prompts.json").read_text())
    for r in rows:
        if r["positive"] == "0":
            assert r["group"] == "" and float(r["lesion_area_frac"]) == 0.0
            continue
        # the group follows the rendered contrast: bright/dark MRI lesions (and their report word), US masses
        expected = "us" if r["modality"] == "us" else ("mri_bright" if float(r["lesion_contrast"]) > 0 else "mri_dark")
        assert r["group"] == expected
        if r["modality"] == "mri":
            assert (" bright " in prompts[r["file"]]) == (expected == "mri_bright")
        assert float(r["lesion_area_frac"]) == pytest.approx(int(r["lesion_area"]) / 64 ** 2, abs=1e-5)
    fracs = np.array([float(r["lesion_area_frac"]) for r in rows if r["positive"] == "1"])
    assert {r["group"] for r in rows} == {"", "mri_bright", "mri_dark", "us"}
    # nominal areas 1-15% (lobulation moves the mask by up to ~1/3); the draws cover the range
    assert fracs.min() > 0.005 and fracs.max() < 0.25
    assert np.percentile(fracs, 20) < 0.03 and np.percentile(fracs, 80) > 0.06
    with pytest.raises(ValueError, match="lesion_area"):
        PhantomConfig(out=str(tmp_path / "x"), lesion_area=(0.2, 0.1))
    with pytest.raises(ValueError, match="pretrain_n"):
        PhantomConfig(out=str(tmp_path / "x"), pretrain_n=-1)
