"""``negdpo import figshare SRC``: the figshare brain-tumour set (Cheng et al., T1-weighted contrast MRI).

    SRC/**/<n>.mat     MATLAB v7.3 (HDF5) with the struct ``cjdata``: image (int16), tumorMask, label
                       (1 meningioma, 2 glioma, 3 pituitary tumor), PID (patient id, char)

Read with ``h5py`` (MATLAB stores arrays column-major, so each array is transposed back to rows x columns);
an older MATLAB v5 file falls back to ``scipy.io.loadmat``. Subject = PID; the label names the tumour in the
prompt. One window per image (``--window``/``--window_preset``, else its 0.5-99.5 percentiles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..imageio import ScanReadError, block_reduce, check_finite, downscale_factor
from ..window import PercentileWindow, reading_options
from .common import Case, Format, Record, SourceError

LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary tumor"}


def read_cjdata(path: Path) -> dict[str, Any]:
    """{image, mask, label, pid} of one .mat file (rows x columns as MATLAB shows them)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "cjdata" not in f:
                raise SourceError(f"{path}: no 'cjdata' struct (keys: {sorted(f.keys())})")
            g = f["cjdata"]
            missing = [k for k in ("image", "tumorMask", "label", "PID") if k not in g]
            if missing:
                raise SourceError(f"{path}: cjdata lacks {missing}")
            image = np.asarray(g["image"][()]).T
            mask = np.asarray(g["tumorMask"][()]).T
            label = int(np.asarray(g["label"][()]).ravel()[0])
            pid = "".join(chr(int(c)) for c in np.asarray(g["PID"][()]).ravel() if int(c))
    except OSError:  # not HDF5: MATLAB v5 and older
        from scipy.io import loadmat

        try:
            cj = loadmat(str(path), squeeze_me=True, struct_as_record=False)["cjdata"]
            image, mask = np.asarray(cj.image), np.asarray(cj.tumorMask)
            label, pid = int(cj.label), str(cj.PID)
        except Exception as err:
            raise ScanReadError(f"{path}: unreadable .mat file ({err})") from err
    if image.shape != mask.shape:
        raise SourceError(f"{path}: tumorMask {mask.shape} does not match image {image.shape}")
    if label not in LABELS:
        raise SourceError(f"{path}: cjdata.label {label} is not one of {sorted(LABELS)}")
    return {"image": image, "mask": mask != 0, "label": label, "pid": pid.strip() or path.stem}


def _load(cfg: Any, path: Path, data: dict[str, Any]) -> list[Record]:
    reading = reading_options(cfg)
    image = data["image"].astype(np.float32)
    check_finite(image, path)
    factor = downscale_factor(path, *image.shape, reading["max_side"], reading["downscale"])
    image, mask = block_reduce(image, factor), block_reduce(data["mask"], factor, majority=True)
    window = reading["window"] or PercentileWindow()
    return [Record(name=f"{data['pid']}_{path.stem}", image=window.apply(image), mask=mask,
                   label=LABELS[data["label"]], source=path.name)]


def read_pid(path: Path) -> str:
    """The patient id alone (one small HDF5 dataset), for listing subjects without reading the images."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            codes = np.asarray(f["cjdata/PID"][()]).ravel()
        return "".join(chr(int(c)) for c in codes if int(c)).strip() or path.stem
    except (OSError, KeyError):  # MATLAB v5, or a malformed file: the full reader names the problem
        return read_cjdata(path)["pid"]


def _raise(err: Exception) -> list[Record]:
    raise err


def figshare_cases(cfg: Any) -> list[Case]:
    src = Path(cfg.src)
    files = sorted(src.rglob("*.mat")) if src.is_dir() else []
    if not files:
        raise SourceError(f"{src}: no .mat files of the figshare brain-tumour set")
    cases = []
    for path in files:
        try:
            pid = read_pid(path)
        except ScanReadError as err:
            if cfg.on_error != "skip":
                raise
            cases.append(Case(f"unreadable/{path.name}", lambda e=err: _raise(e), str(path)))
            continue
        cases.append(Case(pid, lambda p=path: _load(cfg, p, read_cjdata(p)), str(path)))
    return cases


FIGSHARE = Format("figshare", "SRC/**/<n>.mat (MATLAB v7.3: cjdata.image, tumorMask, label, PID)",
                  "mri", "brain", "a brain MRI showing a {label}", "a brain MRI with no tumor", figshare_cases)
