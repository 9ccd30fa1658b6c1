"""``negdpo import``: each format from small files written here in its exact layout (and the shipped pydicom /
nibabel samples); the output is a scan folder every reader reads, split by patient."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.imageio import read_mask, read_nifti, read_raster
from negdpo.core.importers.cli import main as import_main
from negdpo.core.importers.common import split_subjects
from negdpo.core.scans import ScanFolder
from PIL import Image


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _meta(out: Path) -> list[dict]:
    with open(out / "meta.csv", newline="") as f:
        return list(csv.DictReader(f))


def _run(argv: list[str], capsys=None) -> int:
    return import_main(argv)


def _no_subject_in_two_splits(rows: list[dict]) -> None:
    where: dict[str, set] = {}
    for r in rows:
        where.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in where.values()), where


# ------------------------------------------------------------------------------------------------- BUSI
def _busi(src: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("benign", 4), ("malignant", 3), ("normal", 3)):
        for i in range(1, n + 1):
            name = f"{cls} ({i})"
            gray = rng.integers(0, 200, (40, 56), dtype=np.uint8)
            _png(src / cls / f"{name}.png", np.repeat(gray[..., None], 3, axis=-1))  # BUSI stores gray as RGB
            m = np.zeros((40, 56), np.uint8)
            if cls != "normal":
                m[5:12, 8:20] = 255
            _png(src / cls / f"{name}_mask.png", m)
    extra = np.zeros((40, 56), np.uint8)
    extra[30:35, 40:50] = 255
    _png(src / "benign" / "benign (2)_mask_1.png", extra)  # a second lesion: masks are united


def test_busi_layout_union_masks_healthy_and_readers(tmp_path):
    src, out = tmp_path / "Dataset_BUSI_with_GT", tmp_path / "busi"
    _busi(src)
    assert _run(["busi", str(src), "--out", str(out), "--seed", "3"]) == 0
    rows = _meta(out)
    assert len(rows) == 10 and set(rows[0]) >= {"file", "subject_id", "split", "modality", "positive", "source"}
    by_source = {r["source"]: r for r in rows}
    two = by_source["benign/benign (2).png"]
    assert two["file"] == "breast_benign_2.png" and two["label"] == "benign" and two["positive"] == "1"
    mask = read_mask(out / f"{two['split']}_masks" / two["file"])
    assert mask.shape == (56, 56)  # 40 x 56 padded to a square at the bottom, never stretched
    expected = np.zeros((56, 56), bool)
    expected[5:12, 8:20] = expected[30:35, 40:50] = True
    assert np.array_equal(mask, expected)
    image = read_raster(out / f"{two['split']}_images" / two["file"])
    source = read_raster(src / "benign" / "benign (2).png")[..., 0]
    assert image.ndim == 2 and np.allclose(image[:40], source) and not image[40:].any()
    normal = [r for r in rows if r["source"].startswith("normal/")]
    assert all(r["positive"] == "0" and r["label"] == "" for r in normal)
    assert {r["split"] for r in normal} == {"train", "val", "test"}  # split within each class: 3 normals, 3 splits
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts[two["file"]] == "a breast ultrasound image showing a benign tumor"
    assert prompts[normal[0]["file"]] == "a breast ultrasound image with no tumor"
    assert (out / "preview.png").is_file()
    _no_subject_in_two_splits(rows)
    # every reader reads the folder: ScanFolder, the evaluation loader and build-pairs' listing
    folder = ScanFolder(out)
    scans = [s for split in folder.splits() for s in folder.load_split(split)]
    assert len(scans) == 10 and not folder.skipped
    assert sum(s.positive for s in scans) == 7 and all(s.prompt for s in scans)
    from negdpo.segmentation.evaluate import EvalConfig, load_scans

    test_rows = [r for r in rows if r["split"] == "test"]
    loaded, skipped = load_scans(EvalConfig(data=str(out), split="test"))
    assert sorted(s.name for s in loaded) == sorted(r["file"] for r in test_rows) and not skipped
    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.preference.pairs.items import list_items

    items, _ = list_items(BuildConfig(data=str(out), out=str(tmp_path / "pairs")))
    assert {it.subject_id for it in items} == {r["subject_id"] for r in rows}
    # the same command again rewrites in place; other settings are refused
    assert _run(["busi", str(src), "--out", str(out), "--seed", "3"]) == 0
    assert _run(["busi", str(src), "--out", str(out), "--seed", "4"]) == 2


def test_busi_bad_inputs_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "busi"
    _busi(src)
    (src / "malignant" / "malignant (1)_mask.png").unlink()
    assert _run(["busi", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malignant (1).png: no mask 'malignant (1)_mask.png'" in err[0]
    assert _run(["nonsense", str(src), "--out", str(tmp_path / "o2")]) == 2
    assert "format='nonsense': must be one of ['busi', 'figshare', 'brats', 'nifti', 'dicom']" in capsys.readouterr().err


def test_import_help_lists_formats(capsys):
    assert import_main(["--help"]) == 0
    text = capsys.readouterr().out
    for fmt in ("busi", "figshare", "brats", "nifti", "dicom"):
        assert f"\n  {fmt} " in text
    assert "--window_preset" in text and "--train_ratio" in text


# --------------------------------------------------------------------------------------------- figshare
def _mat(path: Path, image: np.ndarray, mask: np.ndarray, label: int, pid: str) -> None:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5, column-major arrays (stored transposed), char as uint16."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("cjdata")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        g.create_dataset("image", data=image.T.astype(np.int16)).attrs["MATLAB_class"] = np.bytes_("int16")
        g.create_dataset("tumorMask", data=mask.T.astype(np.uint8)).attrs["MATLAB_class"] = np.bytes_("logical")
        g.create_dataset("label", data=np.array([[float(label)]])).attrs["MATLAB_class"] = np.bytes_("double")
        codes = np.array([[ord(c)] for c in pid], np.uint16).T
        g.create_dataset("PID", data=codes).attrs["MATLAB_class"] = np.bytes_("char")


def test_figshare_mat_orientation_labels_and_patients(tmp_path):
    src, out = tmp_path / "figshare", tmp_path / "fig"
    rows_cols = (48, 32)  # non-square, as MATLAB shows it: 48 rows x 32 columns
    n = 0
    for p, pid in enumerate(["100360", "MR040214", "112649", "99999", "5"]):
        for _ in range(2):  # two slices per patient: both must land in one split
            n += 1
            image = np.full(rows_cols, 100, np.int16)
            mask = np.zeros(rows_cols, np.uint8)
            mask[2:10, 20:30] = 1  # an asymmetric lesion near the top right
            image[mask == 1] = 1000
            _mat(src / f"part{p % 2}" / f"{n}.mat", image, mask, label=1 + (n % 3), pid=pid)
    assert _run(["figshare", str(src), "--out", str(out), "--window", "0,1000"]) == 0
    rows = _meta(out)
    assert len(rows) == 10 and {r["subject_id"] for r in rows} == {"100360", "MR040214", "112649", "99999", "5"}
    _no_subject_in_two_splits(rows)
    labels = {"1": "meningioma", "2": "glioma", "3": "pituitary tumor"}
    prompts = json.loads((out / "prompts.json").read_text())
    for r in rows:
        n_file = int(r["source"].split(".")[0])
        assert r["label"] == labels[str(1 + n_file % 3)] and prompts[r["file"]] == f"a brain MRI showing a {r['label']}"
        img = read_raster(out / f"{r['split']}_images" / r["file"])
        m = read_mask(out / f"{r['split']}_masks" / r["file"])
        assert m.shape == (48, 48) and m[2:10, 20:30].all() and m.sum() == 80  # rows x columns as in MATLAB
        assert np.allclose(img[m], 1.0) and np.allclose(img[:48, :32][~m[:48, :32]], 0.1, atol=1 / 255)


# ----------------------------------------------------------------------------------------- BraTS / NIfTI
def _store(canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(voxel data, affine) of a canonical RAS+ array stored in A-L-S order with 2 mm voxels."""
    data = np.transpose(canonical[::-1, :, :], (1, 0, 2))  # voxel i = y (anterior), voxel j = -x (left)
    nx = canonical.shape[0]
    affine = np.array([[0.0, -2.0, 0.0, 2.0 * (nx - 1)],
                       [2.0, 0.0, 0.0, -30.0],
                       [0.0, 0.0, 2.0, 5.0],
                       [0.0, 0.0, 0.0, 1.0]])
    return np.ascontiguousarray(data), affine


def _brats_case(folder: Path, case: str, rng: np.random.Generator) -> np.ndarray:
    import nibabel as nib

    shape = (30, 24, 10)  # x (R), y (A), z (S): a non-square axial slice
    canon = np.zeros(shape, np.float32)
    canon[3:27, 2:22, :] = 200 + rng.normal(0, 1, (24, 20, 10))  # "brain"
    seg = np.zeros(shape, np.uint8)
    seg[20:26, 15:21, 4:7] = 2  # oedema on the patient's right, anterior
    seg[22:24, 17:19, 5] = 4  # enhancing core on slice 5 only
    canon[seg > 0] = 600
    data, affine = _store(canon)
    folder.mkdir(parents=True, exist_ok=True)
    for seq in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(data * (1.0 if seq == "flair" else 0.5), affine), folder / f"{case}_{seq}.nii.gz")
    sdata, _ = _store(seg)
    nib.save(nib.Nifti1Image(sdata, affine), folder / f"{case}_seg.nii.gz")
    return seg


def test_brats_slices_orientation_and_label_subset(tmp_path):
    import nibabel as nib

    src, out = tmp_path / "BraTS2021", tmp_path / "brats"
    rng = np.random.default_rng(0)
    for c in range(4):
        _brats_case(src / f"BraTS_{c:03d}", f"BraTS_{c:03d}", rng)
    assert nib.aff2axcodes(nib.load(str(src / "BraTS_000" / "BraTS_000_flair.nii.gz")).affine) == ("A", "L", "S")
    assert _run(["brats", str(src), "--out", str(out), "--healthy_slices", "2"]) == 0
    rows = _meta(out)
    assert len(rows) == 4 * (3 + 2)  # 3 lesion slices + 2 sampled lesion-free slices per case
    assert sum(r["positive"] == "1" for r in rows) == 12
    _no_subject_in_two_splits(rows)
    r = next(r for r in rows if r["source"].endswith("[z=5]"))
    img = read_raster(out / f"{r['split']}_images" / r["file"])
    m = read_mask(out / f"{r['split']}_masks" / r["file"])
    # display orientation: row = anterior at the top (y = 23 - row), column = patient's right on the left
    # (x = 29 - col); the canonical lesion x 20..25, y 15..20 lands at rows 3..8, columns 4..9
    expected = np.zeros((30, 30), bool)
    expected[3:9, 4:10] = True
    assert np.array_equal(m, expected)
    assert img[m].min() > 0.99 and img[~m][: 24 * 30].max() < 0.5  # the lesion voxels are the bright ones
    # the core alone (label 4) is positive on slice 5 only
    out4 = tmp_path / "brats_core"
    assert _run(["brats", str(src), "--out", str(out4), "--labels", "4", "--healthy_slices", "0"]) == 0
    rows4 = _meta(out4)
    assert len(rows4) == 4 and all(r["source"].endswith("[z=5]") for r in rows4)


def test_nifti_mask_in_display_orientation_lines_up_with_image(tmp_path):
    """A mask drawn on the displayed slice (what a viewer shows) marks the same pixels as the image's lesion,
    for images read directly (read_nifti/read_mask) and through the importer."""
    import nibabel as nib

    _brats_case(tmp_path / "c", "c", np.random.default_rng(1))
    img = read_nifti(tmp_path / "c" / "c_flair.nii.gz", index=5)
    mask = read_mask(tmp_path / "c" / "c_seg.nii.gz", index=5)
    assert img.shape == mask.shape == (24, 30)  # rows = y (anterior at top), columns = x
    assert np.array_equal(img > 0.9, mask)
    drawn = np.zeros((24, 30), np.uint8)  # the lesion as seen in display orientation: top left quadrant
    drawn[3:9, 4:10] = 255
    assert np.array_equal(mask, drawn > 0)
    assert mask[:12, :15].sum() == mask.sum()  # anterior (top), patient's right (viewer's left)
    # nibabel's shipped example volume with a label drawn in canonical space
    from nibabel.testing import data_path

    data = Path(data_path)
    anat = nib.load(str(data / "anatomical.nii"))
    canon = nib.as_closest_canonical(anat)
    lab = np.zeros(canon.shape, np.uint8)
    lab[5:9, 30:36, 12] = 1  # right-anterior lesion on axial slice 12 (RAS voxels)
    src = tmp_path / "generic"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    nib.save(anat, src / "images" / "anat_0000.nii")
    assert nib.aff2axcodes(anat.affine) == ("L", "A", "S")  # stored with x reversed: flip it back for the file
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lab[::-1]), anat.affine), src / "labels" / "anat.nii.gz")
    out = tmp_path / "generic_out"
    assert _run(["nifti", str(src), "--out", str(out), "--healthy_slices", "1"]) == 0
    rows = _meta(out)
    pos = [r for r in rows if r["positive"] == "1"]
    assert len(pos) == 1 and pos[0]["source"] == "anat_0000.nii[z=12]" and len(rows) == 2
    m = read_mask(out / f"{pos[0]['split']}_masks" / pos[0]["file"])
    nx, ny = canon.shape[:2]
    expected = np.zeros((max(nx, ny),) * 2, bool)
    expected[ny - 36: ny - 30, nx - 9: nx - 5] = True  # row = ny-1-y, col = nx-1-x
    assert np.array_equal(m, expected)


# ----------------------------------------------------------------------------------------------- DICOM
def test_dicom_shipped_files_subject_from_patient_id(tmp_path):
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    src = tmp_path / "dicom"
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        dst = src / "images" / f"series{i}" / name
        dst.parent.mkdir(parents=True)
        shutil.copy(get_testdata_file(name), dst)
        ds = pydicom.dcmread(dst)
        m = np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8)
        m[10:20, 30:44] = 255
        _png(src / "masks" / f"series{i}" / f"{Path(name).stem}.png", m)
    out = tmp_path / "out"
    assert _run(["dicom", str(src), "--out", str(out), "--window_preset", "ct-abdomen", "--modality", "ct"]) == 0
    rows = _meta(out)
    ids = {pydicom.dcmread(get_testdata_file(n)).PatientID for n in ("CT_small.dcm", "MR_small.dcm")}
    assert {r["subject_id"] for r in rows} == ids and len(rows) == 2
    ct = next(r for r in rows if "CT_small" in r["file"])
    from negdpo.core.imageio import read_dicom
    from negdpo.core.window import Window

    ref = read_dicom(get_testdata_file("CT_small.dcm"), window=Window(-160, 240))
    img = read_raster(out / f"{ct['split']}_images" / ct["file"])
    assert np.allclose(img, ref, atol=0.5 / 255 + 1e-6)
    assert read_mask(out / f"{ct['split']}_masks" / ct["file"])[10:20, 30:44].all()
    (src / "masks" / "series1" / "MR_small.png").unlink()
    assert _run(["dicom", str(src), "--out", str(tmp_path / "o2")]) == 2
    assert _run(["dicom", str(src), "--out", str(tmp_path / "o3"), "--missing_mask", "healthy"]) == 0
    assert {r["positive"] for r in _meta(tmp_path / "o3")} == {"0", "1"}


# ------------------------------------------------------------------------------------------------ splits
def test_split_subjects_is_a_seeded_partition():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.text(min_size=1, max_size=5), max_size=40), st.integers(0, 10**6),
           st.sampled_from([(0.7, 0.1, 0.2), (0.8, 0.0, 0.2), (1.0, 0.0, 0.0), (0.34, 0.33, 0.33)]))
    def law(subjects, seed, ratios):
        a = split_subjects(subjects, ratios, seed)
        assert a == split_subjects(list(reversed(subjects)), ratios, seed)  # order of listing does not matter
        assert set(a) == set(subjects) and set(a.values()) <= {"train", "val", "test"}
        n = len(set(subjects))
        if n >= 10:
            counts = [sum(v == s for v in a.values()) for s in ("train", "val", "test")]
            assert all(abs(c - r * n) <= 1 for c, r in zip(counts, ratios))

    law()


def test_on_error_skip_counts_bad_cases(tmp_path):
    import nibabel as nib

    src = tmp_path / "brats"
    rng = np.random.default_rng(0)
    for c in range(3):
        _brats_case(src / f"case{c}", f"case{c}", rng)
    bad = nib.load(str(src / "case1" / "case1_flair.nii.gz"))
    data = np.asarray(bad.dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, bad.affine), src / "case1" / "case1_flair.nii.gz")
    assert _run(["brats", str(src), "--out", str(tmp_path / "a")]) == 2
    assert _run(["brats", str(src), "--out", str(tmp_path / "b"), "--on_error", "skip"]) == 0
    summary = json.loads((tmp_path / "b" / "import.json").read_text())
    assert len(summary["skipped"]) == 1 and "case1_flair.nii.gz: 1 non-finite voxel" in summary["skipped"][0]
    assert {r["subject_id"] for r in _meta(tmp_path / "b")} == {"case0", "case2"}


@pytest.mark.skipif(os.environ.get("CI_NO_SUBPROCESS") == "1", reason="no subprocess")
def test_negdpo_import_help_from_the_entry_point(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "negdpo", "import", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "figshare" in out.stdout and "brats" in out.stdout
