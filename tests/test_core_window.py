"""Windows, warnings, bad pixels, size limits and square padding on the reading path every command shares."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from negdpo.core.imageio import ScanReadError, read_mask, read_nifti, read_raster, read_scan
from negdpo.core.scans import ScanFolder, ScanFolderError
from negdpo.core.window import PRESETS, PercentileWindow, Window, parse_window, reading_options
from PIL import Image


@pytest.fixture
def warnings_seen():
    """Warnings of negdpo's loggers (they may not propagate to the root logger once a command set them up)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, log = Keep(level=logging.WARNING), logging.getLogger("negdpo")
    log.addHandler(handler)
    yield lambda: [r.getMessage() for r in records]
    log.removeHandler(handler)


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


# ----------------------------------------------------------------------------------------------- windows
def test_parse_window_and_presets():
    assert parse_window("-160,240") == Window(-160.0, 240.0)
    assert parse_window(None, None) is None
    assert PRESETS["ct-abdomen"] == Window(-160.0, 240.0)  # centre 40, width 400 (HU)
    assert PRESETS["ct-brain"] == Window(0.0, 80.0) and PRESETS["ct-lung"] == Window(-1350.0, 150.0)
    assert parse_window(preset="mr-percentile") == PercentileWindow(0.5, 99.5)
    for bad, msg in (("abc", "expected LO,HI"), ("5,5", "finite LO < HI"), ("1,2,3", "expected LO,HI"),
                     ("nan,4", "finite LO < HI")):
        with pytest.raises(ValueError, match=msg):
            parse_window(bad)
    with pytest.raises(ValueError, match="give one of them"):
        parse_window("0,1", "ct-lung")
    with pytest.raises(ValueError, match="ct-liver"):
        parse_window(preset="ct-liver")
    with pytest.raises(ValueError, match="max_side=0"):
        reading_options(type("C", (), {"max_side": 0})())


def test_sixteen_bit_low_range_warns_and_a_window_fixes_it(tmp_path, warnings_seen):
    narrow = (1000 + np.arange(64, dtype=np.uint16).reshape(8, 8) * 20)  # 1000..2260: 1.9% of 0..65535
    path = _png(tmp_path / "ct16.png", narrow)
    dark = read_raster(path)
    assert dark.max() < 0.04  # what the user sees without a window: nearly black
    msgs = warnings_seen()
    assert len(msgs) == 1 and "ct16.png: 16-bit image uses 1.9% of its range (values 1000..2260)" in msgs[0]
    full = read_raster(path, window=parse_window("1000,2260"))
    assert full.min() == 0.0 and full.max() == 1.0
    assert np.allclose(read_raster(path, window=PRESETS["mr-percentile"]),
                       np.clip((narrow - np.percentile(narrow, 0.5)) / np.ptp(np.percentile(narrow, [0.5, 99.5])),
                               0, 1), atol=1e-6)
    assert len(warnings_seen()) == 1  # a window given: no warning
    _png(tmp_path / "wide.png", (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    read_raster(tmp_path / "wide.png")
    assert len(warnings_seen()) == 1  # a 16-bit image using its range: no warning


def test_volume_without_index_and_mask_empty_on_the_slice_warn(tmp_path, warnings_seen):
    vol = np.zeros((6, 6, 5), np.float32)
    vol[1:3, 1:3, :] = 1.0
    _nifti(tmp_path / "v.nii.gz", vol)
    read_nifti(tmp_path / "v.nii.gz", index=1)
    assert warnings_seen() == []
    read_nifti(tmp_path / "v.nii.gz")
    assert "v.nii.gz: a volume of 5 slices is read at its middle slice 2 only" in warnings_seen()[0]
    seg = np.zeros((6, 6, 5), np.uint8)
    seg[1:3, 1:3, 4] = 1  # lesion on slice 4 only; the middle slice 2 is empty
    _nifti(tmp_path / "m.nii.gz", seg)
    assert not read_mask(tmp_path / "m.nii.gz").any()
    assert any("m.nii.gz: the mask is empty on slice 2 but marks lesion on slices 4..4" in m for m in warnings_seen())
    n = len(warnings_seen())
    assert read_mask(tmp_path / "m.nii.gz", index=4).sum() == 4 and len(warnings_seen()) == n


# ------------------------------------------------------------------------------------------ bad pixels
def test_non_finite_pixels_name_the_file_and_skip_mode_counts_them(tmp_path):
    vol = np.ones((8, 8, 1), np.float32)
    vol[2, 3, 0] = np.nan
    root = tmp_path / "scans"
    _nifti(root / "test_images" / "bad.nii.gz", vol)
    _png(root / "test_masks" / "bad.png", np.zeros((8, 8), np.uint8))
    _png(root / "test_images" / "good.png", np.full((8, 8), 100, np.uint8))
    _png(root / "test_masks" / "good.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ScanReadError, match=r"bad\.nii\.gz: 1 non-finite voxel\(s\) \(NaN or inf; first at index "
                                            r"\(2, 3, 0\)\)"):
        read_scan(root / "test_images" / "bad.nii.gz")
    with pytest.raises(ScanFolderError, match="bad.nii.gz: 1 non-finite"):
        ScanFolder(root).load_split("test")
    folder = ScanFolder(root, on_error="skip")
    assert [s.name for s in folder.load_split("test")] == ["good.png"]
    assert len(folder.skipped) == 1 and "bad.nii.gz" in folder.skipped[0][0]
    tif = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.5, np.inf]], np.float32)).save(tif)
    with pytest.raises(ScanReadError, match=r"f\.tif: 1 non-finite pixel"):
        read_raster(tif)


# ----------------------------------------------------------------------------------------------- sizes
def test_oversized_images_are_refused_from_the_header_or_downscaled(tmp_path):
    big = _png(tmp_path / "wide.png", np.zeros((8, 5000), np.uint8))
    with pytest.raises(ScanReadError, match=r"wide\.png: 5000x8 px exceeds the limit of 4096 px per side; pass "
                                            r"--downscale"):
        read_raster(big)
    truncated = tmp_path / "truncated.png"  # header says 5000 x 8, the pixel data is cut: never decoded
    data = big.read_bytes()
    truncated.write_bytes(data[: data.index(b"IDAT") + 12])
    with pytest.raises(ScanReadError, match="exceeds the limit"):
        read_raster(truncated)
    assert read_raster(big, downscale=True).shape == (4, 2500)  # factor ceil(5000 / 4096) = 2
    # an integer box filter: block means, hand-computed on a small image with max_side 4
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    small = _png(tmp_path / "s.png", arr)
    out = read_raster(small, max_side=4, downscale=True)
    expected = arr.reshape(3, 2, 4, 2).mean(axis=(1, 3)) / 255.0
    assert out.shape == (3, 4) and np.allclose(out, expected, atol=1e-6)
    m = np.zeros((6, 8), np.uint8)
    m[0:2, 0:1] = 255  # 2 of 4 pixels of block (0, 0): kept (half), 1 of 4 of block (1, 1): dropped
    m[2, 2] = 255
    mask = read_mask(_png(tmp_path / "m.png", m), max_side=4, downscale=True)
    assert mask.tolist() == [[True, False, False, False], [False, False, False, False], [False] * 4]


def test_downscaling_an_8000_px_scan_keeps_memory_bounded(tmp_path):
    path = _png(tmp_path / "huge.png", np.zeros((8000, 8000), np.uint8))  # 64 MB of 8-bit pixels
    tracemalloc.start()
    try:
        with pytest.raises(ScanReadError, match="8000x8000 px exceeds"):
            read_raster(path)
        refused = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        out = read_raster(path, downscale=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (4000, 4000)
    assert refused < 1e6  # the header alone
    assert peak < 2.5 * 64e6  # the decoded bytes (64 MB) and one block mean (4000^2 float32, 64 MB), no more


# ---------------------------------------------------------------------------------------------- square
def test_non_square_scans_are_padded_not_stretched(tmp_path):
    root = tmp_path / "s"
    img = (np.arange(60, dtype=np.uint8).reshape(10, 6) * 4)
    m = np.zeros((10, 6), np.uint8)
    m[7:9, 4:6] = 255
    _png(root / "test_images" / "a.png", img)
    _png(root / "test_masks" / "a.png", m)
    (scan,) = ScanFolder(root).load_split("test")
    assert scan.image.shape == scan.mask.shape == (10, 10) and scan.original_size == (10, 6)
    assert np.allclose(scan.image[:, :6], img / 255.0) and not scan.image[:, 6:].any()  # padded at the right
    assert np.array_equal(scan.mask[:, :6], m > 0) and not scan.mask[:, 6:].any()
    (kept,) = ScanFolder(root, square="keep").load_split("test")
    assert kept.image.shape == (10, 6)


def test_a_mask_in_voxel_order_is_named_as_turned(tmp_path):
    vol = np.zeros((12, 7, 1), np.float32)  # X = 12, Y = 7: displayed as 7 rows x 12 columns
    vol[2:4, 1:3, 0] = 1.0
    root = tmp_path / "v"
    _nifti(root / "test_images" / "a.nii.gz", vol)
    _png(root / "test_masks" / "a.png", (vol[:, :, 0] > 0).astype(np.uint8) * 255)  # drawn in voxel order
    with pytest.raises(ScanFolderError, match=r"mask size 7x12 does not match image a\.nii\.gz size 12x7 \(W x H\); "
                                              r"it is the image turned by 90 degrees"):
        ScanFolder(root).load_split("test")
    _png(root / "test_masks" / "a.png", (vol[::-1, ::-1, 0].T > 0).astype(np.uint8) * 255)  # the displayed view
    (scan,) = ScanFolder(root, square="keep").load_split("test")
    assert np.array_equal(scan.mask, scan.image > 0.5)


# ------------------------------------------------------------------------------------ commands take it
def test_every_scan_reading_command_accepts_the_window(tmp_path):
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.generator.config import GenTrainConfig
    from negdpo.generator.data import pairs_from_scan_folder
    from negdpo.generator.sample import _parser as sample_parser
    from negdpo.preference.clip.config import ClipTrainConfig
    from negdpo.preference.pairs.config import BuildConfig
    from negdpo.segmentation.cli import build_parser as eval_parser
    from negdpo.segmentation.evaluate import EvalConfig, load_scans

    root = tmp_path / "ct"
    raw = np.full((16, 16), 1040, np.uint16)  # 16-bit CT stored as HU + 1000
    raw[4:8, 4:8] = 1200
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    for split in ("train", "test"):
        _png(root / f"{split}_images" / "a.png", raw)
        _png(root / f"{split}_masks" / "a.png", m)
    (scan,), _ = load_scans(EvalConfig(data=str(root), window="1000,1200"))
    assert np.allclose(scan.image[scan.mask], 1.0) and np.allclose(scan.image[~scan.mask], 0.2, atol=1e-6)
    with pytest.raises(ValueError, match="--window 'x': expected LO,HI"):
        EvalConfig(window="x")
    a = eval_parser().parse_args(["--data", "d", "--out", "o", "--window_preset", "ct-brain", "--downscale"])
    assert reading_options(a) == {"window": PRESETS["ct-brain"], "max_side": 4096, "downscale": True}
    a = sample_parser().parse_args(["--data", "d", "--out", "o", "--window", "0,80", "--max_side", "512"])
    assert reading_options(a) == {"window": Window(0.0, 80.0), "max_side": 512, "downscale": False}
    with pytest.raises(ValueError, match="--window_preset 'ct-x'"):
        BuildConfig(data=str(root), out=str(tmp_path / "p"), window_preset="ct-x").validate()
    gen = parse_config(GenTrainConfig, ["--window", "1000,1200", "--dataset_name", str(root)])
    pairs = pairs_from_scan_folder(root, "train", 16, chosen="classical", reading=gen.reading())
    plain = pairs_from_scan_folder(root, "train", 16, chosen="classical")
    assert pairs[0].source.max() > 0.99 > plain[0].source.max()  # the window reached the generator's data
    with pytest.raises((ValueError, ConfigError), match="--window"):
        parse_config(ClipTrainConfig, ["--window", "9,1"])
    assert ClipTrainConfig(window_preset="ct-lung").reading()["window"] == PRESETS["ct-lung"]


def test_the_segmentation_trainers_read_through_the_window(tmp_path):
    """pretrain-sam, seg_train and train-vlm take the same reading options, and they reach the scans they read."""
    from negdpo.core.config import ConfigError, parse_config
    from negdpo.segmentation.prompt_free.train import SegTrainConfig
    from negdpo.segmentation.sam_pretrain import SamPretrainConfig, load_pool
    from negdpo.segmentation.vlm_train import VlmTrainConfig

    root = tmp_path / "ct"
    raw = np.full((32, 32), 1040, np.uint16)  # 16-bit CT stored as HU + 1000
    raw[8:16, 8:16] = 1200
    m = np.zeros((32, 32), np.uint8)
    m[8:16, 8:16] = 255
    _png(root / "train_images" / "a.png", raw)
    _png(root / "train_masks" / "a.png", m)
    for cls in (SamPretrainConfig, SegTrainConfig, VlmTrainConfig):
        cfg = parse_config(cls, ["--window", "1000,1200", "--max_side", "64"])
        assert cfg.reading() == {"window": Window(1000.0, 1200.0), "max_side": 64, "downscale": False}, cls
        with pytest.raises((ValueError, ConfigError), match="--window"):
            parse_config(cls, ["--window", "9,1"])
    cfg = parse_config(SamPretrainConfig, ["--window", "1000,1200"])
    (windowed,) = load_pool(root, "train", 32, 0.01, 0.5, cfg.reading())
    (plain,) = load_pool(root, "train", 32, 0.01, 0.5)
    assert windowed.rgb[10, 10, 0] == 255 and windowed.rgb[0, 0, 0] == 51  # (1040 - 1000) / 200 -> 0.2
    assert plain.rgb[10, 10, 0] < 255  # without it the 16-bit range divides everything down
