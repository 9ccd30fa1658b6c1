"""Scan I/O: formats, windows, folder pairing, and every bad-input case with its exact error."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.imageio import (
    ScanReadError,
    Window,
    read_dicom,
    read_mask,
    read_nifti,
    read_raster,
    read_scan,
)
from negdpo.core.scans import (
    EmptyFolderError,
    MissingMaskError,
    ScanFolder,
    ScanFolderError,
    SizeMismatchError,
)
from PIL import Image


def _write(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, names=("a", "b", "c"), size=(20, 30)) -> Path:
    for i, n in enumerate(names):
        img = np.full(size, 10 * (i + 1), np.uint8)
        m = np.zeros(size, np.uint8)
        m[2:5, 3:9] = 1  # 0/1 mask: any non-zero is lesion
        _write(root / "test_images" / f"{n}.png", img)
        _write(root / "test_masks" / f"{n}.png", m)
    return root


def test_8bit_16bit_rgb(tmp_path):
    g8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.allclose(read_raster(_write(tmp_path / "g8.png", g8)), g8 / 255.0)
    g16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    out16 = read_raster(_write(tmp_path / "g16.png", g16))
    assert out16.dtype == np.float32 and np.allclose(out16, g16 / 65535.0, atol=1e-6)
    # an explicit window on 16-bit data maps [low, high] to [0, 1] and clips outside
    win = read_raster(tmp_path / "g16.png", window=Window(0, 257 * 100))
    assert win[0, 0] == 0 and win.reshape(-1)[50] == pytest.approx(0.5) and win.max() == 1.0
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    out = read_raster(_write(tmp_path / "rgb.jpg", rgb))
    assert out.shape == (8, 8, 3) and out[..., 0].mean() > 0.9


def test_real_dicom_samples_with_windows():
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm", download=False)
    mr = get_testdata_file("MR_small.dcm", download=False)
    assert ct and mr, "pydicom's bundled sample files are missing"
    ct_img = read_dicom(ct, window=Window.from_center_width(40, 400))  # soft-tissue window in HU
    assert ct_img.shape == (128, 128) and 0.0 <= ct_img.min() and ct_img.max() <= 1.0
    # the window is applied after the modality LUT: a pixel at HU=40 would map to 0.5
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(ct)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert np.allclose(ct_img, np.clip((hu - (40 - 200)) / 400, 0, 1), atol=1e-6)
    # MR_small carries WindowCenter/Width; without an explicit window those are used
    mr_img = read_scan(mr)
    ds = pydicom.dcmread(mr)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert np.allclose(mr_img, np.clip((ds.pixel_array - (c - w / 2)) / w, 0, 1), atol=1e-6)


def test_real_nifti_samples_by_slice():
    import nibabel

    data = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data"
    vol_path = data / "anatomical.nii"
    vol = np.asarray(nibabel.load(str(vol_path)).dataobj, dtype=np.float64)
    s3 = read_nifti(vol_path, index=3, window=Window(vol.min(), vol.max()))
    # the file is stored L-A-S: canonical RAS+ flips voxel axis 0; the display orientation puts anterior at the
    # top and the patient's right on the left, so display[r, c] = voxel[c, Y-1-r, 3] (hand-derived)
    assert nibabel.aff2axcodes(nibabel.load(str(vol_path)).affine) == ("L", "A", "S")
    assert s3.shape == vol.shape[:2][::-1]
    expected = vol[:, ::-1, 3].T
    assert np.allclose(s3, (expected - vol.min()) / (vol.max() - vol.min()), atol=1e-6)
    four_d = read_nifti(data / "example4d.nii.gz")  # 4-D: first volume, middle slice
    assert four_d.ndim == 2 and 0 <= four_d.min() and four_d.max() <= 1
    with pytest.raises(ScanReadError, match="slice 999 out of range"):
        read_nifti(vol_path, index=999)


def test_masks_binarised_any_nonzero(tmp_path):
    m = np.array([[0, 1, 255], [0, 0, 7]], np.uint8)
    assert read_mask(_write(tmp_path / "m.png", m)).tolist() == [[False, True, True], [False, False, True]]


def test_folder_pairs_by_name_not_order(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    _write(root / "test_masks" / "zz_orphan_mask.png", np.zeros((20, 30), np.uint8))
    real_iterdir = Path.iterdir

    def shuffled(self):
        items = list(real_iterdir(self))
        random.Random(1).shuffle(items)
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    scans = ScanFolder(root).load_split("test")
    assert [s.name for s in scans] == ["a.png", "b.png", "c.png"]
    for s, val in zip(scans, (10, 20, 30)):  # each image met its own mask
        assert s.image_path.stem == s.mask_path.stem
        assert s.image[0, 0] == pytest.approx(val / 255)
        assert s.mask.sum() == 18 and s.positive


def test_jpg_image_pairs_with_png_mask(tmp_path):
    _write(tmp_path / "train_images" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "train_masks" / "x.png", np.zeros((8, 8), np.uint8))
    (scan,) = ScanFolder(tmp_path).load_split("train")
    assert not scan.positive and scan.image.shape == (8, 8, 3)


def test_missing_mask_error_names_file(tmp_path):
    root = _folder(tmp_path)
    (root / "test_masks" / "b.png").unlink()
    with pytest.raises(MissingMaskError, match=r"test_images/b\.png: no mask named 'b\.\*'"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert [s.name for s in folder.load_split("test")] == ["a.png", "c.png"]
    assert len(folder.skipped) == 1 and "b.png" in folder.skipped[0][1]


def test_size_mismatch_error(tmp_path):
    root = _folder(tmp_path)
    _write(root / "test_masks" / "c.png", np.zeros((21, 30), np.uint8))
    with pytest.raises(SizeMismatchError, match=r"c\.png: mask size 30x21 does not match image c\.png size 30x20"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert len(folder.load_split("test")) == 2 and "1 file(s) skipped" in folder.report()


def test_unreadable_image_error(tmp_path):
    root = _folder(tmp_path)
    (root / "test_images" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(ScanFolderError, match=r"a\.png: unreadable image"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert [s.name for s in folder.load_split("test")] == ["b.png", "c.png"]


def test_empty_directory_errors(tmp_path):
    (tmp_path / "test_images").mkdir()
    with pytest.raises(EmptyFolderError, match="no images found"):
        ScanFolder(tmp_path).load_split("test")
    with pytest.raises(EmptyFolderError, match="image directory does not exist"):
        ScanFolder(tmp_path).load_split("val")
    with pytest.raises(ScanFolderError, match="scan folder does not exist"):
        ScanFolder(tmp_path / "nope")


def test_corrupt_twin_named_and_skipped_in_skip_mode(tmp_path):
    root = _folder(tmp_path)
    for n in ("a", "b", "c"):
        _write(root / "test_twins" / f"{n}.png", np.full((20, 30), 5, np.uint8))
    (root / "test_twins" / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ScanFolderError, match=r"test_twins/b\.png: unreadable image"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    scans = folder.load_split("test")
    assert [s.name for s in scans] == ["a.png", "c.png"] and all(s.twin is not None for s in scans)
    assert folder.skipped[0][0].endswith("test_twins/b.png")


def test_twin_size_checked(tmp_path):
    root = _folder(tmp_path)
    _write(root / "test_twins" / "a.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(SizeMismatchError, match=r"test_twins/a\.png: twin size 31x20 does not match image a\.png"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert [s.name for s in folder.load_split("test")] == ["b.png", "c.png"]


def test_duplicate_stems_named(tmp_path):
    from negdpo.core.scans import DuplicateStemError

    root = _folder(tmp_path)
    _write(root / "test_images" / "a.jpg", np.zeros((20, 30), np.uint8))  # a.png + a.jpg: which one pairs?
    with pytest.raises(DuplicateStemError, match=r"'a\.jpg' and 'a\.png' in .*test_images share the name 'a'"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert [s.name for s in folder.load_split("test")] == ["b.png", "c.png"]
    assert len(folder.skipped) == 1 and "a.png" in folder.skipped[0][1]
    # two masks for one image are just as ambiguous
    (root / "test_images" / "a.jpg").unlink()
    _write(root / "test_masks" / "b.jpg", np.zeros((20, 30), np.uint8))
    with pytest.raises(DuplicateStemError, match=r"'b\.jpg' and 'b\.png' in .*test_masks"):
        ScanFolder(root).load_split("test")
    _write(root / "negatives" / "n.png", np.zeros((4, 4), np.uint8))
    _write(root / "negatives" / "n.bmp", np.zeros((4, 4), np.uint8))
    with pytest.raises(DuplicateStemError, match="share the name 'n'"):
        ScanFolder(root).negatives()


@pytest.mark.parametrize("text, problem", [
    ('{"a.png": "x",}', r"not valid JSON \(.* at line 1, column \d+\)"),
    ('["a.png"]', r"expected a JSON object .* got a JSON list"),
    ('{"a.png": 3}', r"the prompt for 'a\.png' is not text \(int\)"),
])
def test_malformed_prompts_json_names_file(tmp_path, text, problem):
    root = _folder(tmp_path)
    (root / "prompts.json").write_text(text)
    with pytest.raises(ScanFolderError, match=r"prompts\.json: " + problem):
        ScanFolder(root, on_error="skip").load_split("test")


def test_prompts_by_name_or_stem(tmp_path):
    root = _folder(tmp_path)
    (root / "prompts.json").write_text('{"a.png": "by name", "b": "by stem"}')
    scans = ScanFolder(root).load_split("test")
    assert [s.prompt for s in scans] == ["by name", "by stem", None]


def test_one_split_alias_table_for_folders_and_datasets():
    """``val`` / ``valid`` / ``dev`` are the dataset split ``validation`` everywhere (the pair builder, the
    CLIP and the generator readers all use core.scans); other names stay themselves."""
    from negdpo.core.scans import dataset_split, split_matches

    assert [dataset_split(s) for s in ("val", "valid", "dev", "validation", "train", "test", "pool")] == [
        "validation", "validation", "validation", "validation", "train", "test", "pool"]
    assert split_matches("val", "validation") and split_matches("dev", "val") and split_matches("test", "test")
    assert not split_matches("val", "test") and not split_matches("train", "training")
