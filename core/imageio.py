"""Reading scans and masks: 8/16-bit and RGB PNG/JPG, DICOM and NIfTI slices.

Every reader returns float32 intensities in [0, 1], shape (H, W) for grayscale or (H, W, 3) for RGB.

Intensity windows (documented behaviour):
  * 8-bit PNG/JPG: value / 255.
  * 16-bit PNG/TIFF: value / 65535 unless a ``Window`` is given (a warning when the image spans < 5% of
    the 16-bit range, i.e. would look uniform).
  * DICOM: modality LUT (RescaleSlope/Intercept) first, then the given ``Window``; without one the
    file's own WindowCenter/WindowWidth; without those the slice's 0.5-99.5 percentile range.
  * NIfTI: the given ``Window``; without one the 0.5-99.5 percentile range of the whole volume, so
    every slice of a volume shares one window. Volumes are reoriented to RAS+
    (``nibabel.as_closest_canonical``) and slices shown in one display orientation (``to_display``).

Non-finite pixels raise ``ScanReadError`` naming the file; an image side over ``max_side`` (default 4096)
is refused from the file header before decoding, or shrunk by an integer box filter with ``downscale``.
Windows and presets: ``negdpo.core.window`` (docs/method.md#windows).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .window import LOW_RANGE_SHARE, MAX_SIDE, PercentileWindow, Window, WindowLike, range_share

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ScanReadError(ValueError):
    """An image or mask file could not be read; the message names the file."""


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> Window:
    return PercentileWindow(lo, hi).resolve(values)


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    """File name without its (possibly double, e.g. .nii.gz) suffix."""
    suffix = suffix_of(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def is_scan_file(path: Path) -> bool:
    return path.is_file() and suffix_of(path) in IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


def check_finite(values: np.ndarray, path: Path, what: str = "pixel") -> None:
    """Raise a one-line ``ScanReadError`` naming the file when ``values`` holds NaN or inf."""
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise ScanReadError(f"{path}: {bad} non-finite {what}(s) (NaN or inf; first at index {first}); "
                            "replace them (e.g. by 0) before reading")


def downscale_factor(path: Path, height: int, width: int, max_side: int, downscale: bool) -> int:
    """1 when the size is within ``max_side``; the integer shrink factor with ``downscale``; else refuse."""
    if max(height, width) <= max_side:
        return 1
    if not downscale:
        raise ScanReadError(f"{path}: {width}x{height} px exceeds the limit of {max_side} px per side; pass "
                            "--downscale to shrink it on reading (masks alike) or raise --max_side")
    return -(-max(height, width) // max_side)


def block_reduce(values: np.ndarray, factor: int, majority: bool = False) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (the last rows/columns that do not fill a block are dropped);
    ``majority``: a bool mask stays True where at least half of a block is True."""
    if factor == 1:
        return values
    h, w = values.shape[0] // factor, values.shape[1] // factor
    blocks = values[: h * factor, : w * factor].reshape(h, factor, w, factor, *values.shape[2:])
    mean = blocks.mean(axis=(1, 3), dtype=np.float32)
    return mean >= 0.5 if majority else mean


def _low_range_warning(arr: np.ndarray, path: Path) -> None:
    share = range_share(arr)
    if share < LOW_RANGE_SHARE:
        logger.warning("%s: 16-bit image uses %.1f%% of its range (values %d..%d) and shows nearly uniform at "
                       "/65535; pass --window LO,HI or --window_preset (e.g. mr-percentile)", path, 100 * share,
                       int(arr.min()), int(arr.max()))


def read_raster(path: str | Path, window: WindowLike | None = None, max_side: int = MAX_SIDE,
                downscale: bool = False) -> np.ndarray:
    """Read a PNG/JPG/TIFF (8-bit, 16-bit, grayscale, RGB, palette) as float32 in [0, 1].

    The size is checked from the header before the pixels are decoded (``downscale_factor``)."""
    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        with Image.open(path) as im:
            factor = downscale_factor(path, im.height, im.width, max_side, downscale)
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ScanReadError):
            raise
        raise ScanReadError(f"{path}: unreadable image ({err})") from err
    if mode == "1":
        return block_reduce(arr.astype(np.float32), factor)
    check_finite(arr, path)
    stored = arr.dtype
    if window is None and stored in (np.uint16, np.int32, np.int16, np.uint32):
        _low_range_warning(arr, path)
    arr = block_reduce(arr, factor)
    if window is not None:
        return window.apply(arr)
    out = arr.astype(np.float32, copy=factor == 1)  # in place from here: one float copy of the pixels at most
    if stored == np.uint8:
        out /= 255.0
        return out
    if stored in (np.uint16, np.int32, np.int16, np.uint32):  # 16-bit modes decode as I;16 / I
        out /= 65535.0
        return np.clip(out, 0.0, 1.0, out=out)
    if stored.kind == "f":
        return np.clip(out, 0.0, 1.0, out=out)
    raise ScanReadError(f"{path}: unsupported pixel type {arr.dtype} (mode {mode})")


def read_dicom(path: str | Path, window: WindowLike | None = None, frame: int = 0, max_side: int = MAX_SIDE,
               downscale: bool = False) -> np.ndarray:
    """Read one DICOM file (frame ``frame`` of a multi-frame file) with its modality LUT applied."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        ds = pydicom.dcmread(path)
        factor = downscale_factor(path, int(ds.Rows), int(ds.Columns), max_side, downscale)
        pixels = ds.pixel_array
    except ScanReadError:
        raise
    except Exception as err:  # pydicom raises many types for corrupt data
        raise ScanReadError(f"{path}: unreadable DICOM ({err})") from err
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        if not 0 <= frame < pixels.shape[0]:
            raise ScanReadError(f"{path}: frame {frame} out of range (0..{pixels.shape[0] - 1})")
        pixels = pixels[frame]
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    check_finite(values, path)
    values = block_reduce(values, factor)
    if window is None:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            window = Window.from_center_width(center, width)
        else:
            window = PercentileWindow()
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


def to_display(slc: np.ndarray) -> np.ndarray:
    """A slice of a canonical (RAS+) volume in the display orientation (docs/method.md#display-orientation).

    Rows run from superior/anterior (top) down and columns from the patient's right/anterior (left), the
    radiological convention: ``display[r, c] = slice[X-1-c, Y-1-r]`` for a slice of shape (X, Y)."""
    return np.ascontiguousarray(slc[::-1, ::-1].T)


def load_canonical_volume(path: str | Path, what: str = "NIfTI"):
    """(canonical 3-D nibabel image, its data) of a NIfTI file (first volume of a 4-D file); errors name it."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        while len(img.shape) > 3:
            img = img.slicer[..., 0]
        if len(img.shape) == 3:
            img = nib.as_closest_canonical(img)
        vol = np.asanyarray(img.dataobj)
    except Exception as err:
        raise ScanReadError(f"{path}: unreadable {what} ({err})") from err
    return img, vol


def _slice_index(path: Path, n: int, index: int | None, axis: int) -> int:
    if index is None:
        if n > 1:
            logger.warning("%s: a volume of %d slices is read at its middle slice %d only; give a slice index "
                           "or import every slice with `negdpo import nifti`", path, n, n // 2)
        return n // 2
    if not 0 <= index < n:
        raise ScanReadError(f"{path}: slice {index} out of range (0..{n - 1}) on axis {axis}")
    return index


def read_nifti(path: str | Path, index: int | None = None, axis: int = 2, window: WindowLike | None = None,
               max_side: int = MAX_SIDE, downscale: bool = False) -> np.ndarray:
    """Slice ``index`` (default: middle, with a warning) along ``axis`` of the canonical (RAS+) volume, in the
    display orientation (``to_display``); the window is resolved on the whole volume."""
    path = Path(path)
    _, vol = load_canonical_volume(path)
    vol = vol.astype(np.float64, copy=False)
    check_finite(vol, path, "voxel")
    if vol.ndim == 2:
        slc = vol
    else:
        slc = np.take(vol, _slice_index(path, vol.shape[axis], index, axis), axis=axis)
    slc = to_display(slc)
    slc = block_reduce(slc, downscale_factor(path, *slc.shape, max_side, downscale))
    return (window or PercentileWindow()).resolve(vol).apply(slc)


def nifti_num_slices(path: str | Path, axis: int = 2) -> int:
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) < 3:
        return 1
    ornt = nib.orientations.io_orientation(img.affine)  # canonical axis k is voxel axis ornt[:, 0] == k
    return int(img.shape[int(np.flatnonzero(ornt[:, 0] == axis)[0])])


def read_scan(path: str | Path, window: WindowLike | None = None, index: int | None = None,
              max_side: int = MAX_SIDE, downscale: bool = False) -> np.ndarray:
    """Read any supported scan file by suffix."""
    path = Path(path)
    suffix = suffix_of(path)
    size = {"max_side": max_side, "downscale": downscale}
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, window=window, frame=index or 0, **size)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, index=index, window=window, **size)
    if suffix in IMAGE_SUFFIXES:
        return read_raster(path, window=window, **size)
    raise ScanReadError(f"{path}: unsupported file type '{suffix}'")


def read_mask(path: str | Path, index: int | None = None, max_side: int = MAX_SIDE,
              downscale: bool = False) -> np.ndarray:
    """Read a lesion mask as bool (H, W): any non-zero pixel is lesion (0/1 and 0/255 masks both work).

    NIfTI masks are sliced and oriented as ``read_nifti`` slices images; a mask volume that is empty on the
    chosen slice but not elsewhere is warned about (the scan would count as healthy)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        _, vol = load_canonical_volume(path, "NIfTI mask")
        if vol.ndim == 2:
            arr = vol != 0
        else:
            k = _slice_index(path, vol.shape[2], index, 2)
            arr = vol[:, :, k] != 0
            if not arr.any() and np.any(vol):
                hit = np.flatnonzero(np.any(vol != 0, axis=(0, 1)))
                logger.warning("%s: the mask is empty on slice %d but marks lesion on slices %d..%d; this scan "
                               "counts as healthy (choose a slice or use `negdpo import nifti`)",
                               path, k, hit[0], hit[-1])
        arr = to_display(arr)
        return block_reduce(arr, downscale_factor(path, *arr.shape, max_side, downscale), majority=True)
    if not path.exists():
        raise ScanReadError(f"{path}: file does not exist")
    try:
        with Image.open(path) as im:
            factor = downscale_factor(path, im.height, im.width, max_side, downscale)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ScanReadError):
            raise
        raise ScanReadError(f"{path}: unreadable mask ({err})") from err
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    return block_reduce(arr != 0, factor, majority=True)


def pad_to_square(values: np.ndarray, fill: float = 0) -> np.ndarray:
    """Pad (never stretch) a non-square image or mask at the bottom or right to a square (docs/method.md#square-scans)."""
    h, w = values.shape[:2]
    if h == w:
        return values
    side = max(h, w)
    pad = [(0, side - h), (0, side - w)] + [(0, 0)] * (values.ndim - 2)
    return np.pad(values, pad, constant_values=fill)


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
