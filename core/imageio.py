"""Reading scans and masks: 8/16-bit and RGB PNG/JPG, DICOM and NIfTI slices.

Every reader returns float32 intensities in [0, 1], shape (H, W) for grayscale or (H, W, 3) for RGB.

Intensity windows (documented behaviour):
  * 8-bit PNG/JPG: value / 255.
  * 16-bit PNG/TIFF: value / 65535 unless a ``Window`` is given.
  * DICOM: modality LUT (RescaleSlope/Intercept) first, then the given ``Window``; without one the
    file's own WindowCenter/WindowWidth; without those the slice's 0.5-99.5 percentile range.
  * NIfTI: the given ``Window``; without one the 0.5-99.5 percentile range of the whole volume, so
    every slice of a volume shares one window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ScanReadError(ValueError):
    """An image or mask file could not be read; the message names the file."""


@dataclass(frozen=True)
class Window:
    """Intensity window mapping [low, high] (in stored/modality units) to [0, 1]."""

    low: float
    high: float

    @classmethod
    def from_center_width(cls, center: float, width: float) -> Window:
        return cls(center - width / 2.0, center + width / 2.0)

    def apply(self, values: np.ndarray) -> np.ndarray:
        if not self.high > self.low:
            raise ValueError(f"empty intensity window [{self.low}, {self.high}]")
        out = (values.astype(np.float64) - self.low) / (self.high - self.low)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> Window:
    a, b = np.percentile(values, [lo, hi])
    if b <= a:  # constant image: any window maps it to 0
        b = a + 1.0
    return Window(float(a), float(b))


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    """File name without its (possibly double, e.g. .nii.gz) suffix."""
    suffix = suffix_of(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def is_scan_file(path: Path) -> bool:
    return path.is_file() and suffix_of(path) in IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


def read_raster(path: str | Path, window: Window | None = None) -> np.ndarray:
    """Read a PNG/JPG/TIFF (8-bit, 16-bit, grayscale, RGB, palette) as float32 in [0, 1]."""
    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ScanReadError(f"{path}: unreadable image ({err})") from err
    if mode == "1":
        arr = arr.astype(np.uint8)
        return arr.astype(np.float32)
    if window is not None:
        return window.apply(arr)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.int16, np.uint32):  # 16-bit modes decode as I;16 / I
        return np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    if arr.dtype.kind == "f":
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise ScanReadError(f"{path}: unsupported pixel type {arr.dtype} (mode {mode})")


def read_dicom(path: str | Path, window: Window | None = None, frame: int = 0) -> np.ndarray:
    """Read one DICOM file (frame ``frame`` of a multi-frame file) with its modality LUT applied."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for corrupt data
        raise ScanReadError(f"{path}: unreadable DICOM ({err})") from err
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        if not 0 <= frame < pixels.shape[0]:
            raise ScanReadError(f"{path}: frame {frame} out of range (0..{pixels.shape[0] - 1})")
        pixels = pixels[frame]
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if window is None:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            window = Window.from_center_width(center, width)
        else:
            window = percentile_window(values)
    return window.apply(values)


def dicom_series(folder: str | Path) -> list[Path]:
    """DICOM files of a series folder in slice order (InstanceNumber, then file name)."""
    import pydicom

    files = [p for p in sorted(Path(folder).iterdir()) if suffix_of(p) in DICOM_SUFFIXES]
    if not files:
        raise ScanReadError(f"{folder}: no DICOM files (*.dcm)")

    def order(p: Path) -> tuple[int, str]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        return int(getattr(ds, "InstanceNumber", 0) or 0), p.name

    return sorted(files, key=order)


def read_nifti(path: str | Path, index: int | None = None, axis: int = 2,
               window: Window | None = None) -> np.ndarray:
    """Read slice ``index`` (default: middle) along ``axis`` of a NIfTI volume (first volume if 4-D)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        vol = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    except Exception as err:
        raise ScanReadError(f"{path}: unreadable NIfTI ({err})") from err
    while vol.ndim > 3:
        vol = vol[..., 0]
    if vol.ndim == 2:
        slc = vol
    else:
        n = vol.shape[axis]
        index = n // 2 if index is None else index
        if not 0 <= index < n:
            raise ScanReadError(f"{path}: slice {index} out of range (0..{n - 1}) on axis {axis}")
        slc = np.take(vol, index, axis=axis)
    window = window or percentile_window(vol)
    return window.apply(slc)


def nifti_num_slices(path: str | Path, axis: int = 2) -> int:
    import nibabel as nib

    shape = nib.load(str(path)).shape
    return 1 if len(shape) < 3 else int(shape[axis])


def read_scan(path: str | Path, window: Window | None = None, index: int | None = None) -> np.ndarray:
    """Read any supported scan file by suffix."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, window=window, frame=index or 0)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, index=index, window=window)
    if suffix in IMAGE_SUFFIXES:
        return read_raster(path, window=window)
    raise ScanReadError(f"{path}: unsupported file type '{suffix}'")


def read_mask(path: str | Path, index: int | None = None) -> np.ndarray:
    """Read a lesion mask as bool (H, W): any non-zero pixel is lesion (0/1 and 0/255 masks both work)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            vol = np.asarray(nib.load(str(path)).dataobj)
        except Exception as err:
            raise ScanReadError(f"{path}: unreadable NIfTI mask ({err})") from err
        while vol.ndim > 3:
            vol = vol[..., 0]
        arr = vol if vol.ndim == 2 else vol[:, :, vol.shape[2] // 2 if index is None else index]
        return arr != 0
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ScanReadError(f"{path}: unreadable mask ({err})") from err
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    return arr != 0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round half to even, saturating)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float grayscale or RGB -> (H, W, 3) uint8, the input format of CLIP and SAM."""
    u8 = to_uint8(image)
    return np.repeat(u8[..., None], 3, axis=-1) if u8.ndim == 2 else u8[..., :3]


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) float -> (H, W) float (ITU-R 601 luma for RGB)."""
    if image.ndim == 2:
        return image
    return (image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write a [0,1] float or uint8/bool array as 8-bit PNG, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = to_uint8(arr)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)  # fast; lossless anyway
    tmp.replace(path)
