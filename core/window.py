"""Intensity windows and the scan-reading options every command that reads scans shares.

    Window(-160, 240)                      # [low, high] in stored/modality units (HU for CT) -> [0, 1]
    parse_window("0,80")                   # --window LO,HI
    parse_window(preset="ct-lung")         # --window_preset NAME (PRESETS)
    ScanFolder(root, **cfg.reading())      # a config that includes ScanReading

Presets (docs/method.md#windows): CT windows are centre/width pairs in Hounsfield units; ``mr-percentile``
maps the 0.5-99.5 percentile range of the image (of the whole volume for NIfTI) to [0, 1].
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_SIDE = 4096  # default limit on an image side in pixels (ScanReading.max_side)
LOW_RANGE_SHARE = 0.05  # a 16-bit image using less than this share of 0..65535 is warned about


@dataclass(frozen=True)
class Window:
    """Intensity window mapping [low, high] (in stored/modality units) to [0, 1]."""

    low: float
    high: float

    @classmethod
    def from_center_width(cls, center: float, width: float) -> Window:
        return cls(center - width / 2.0, center + width / 2.0)

    def resolve(self, values: np.ndarray) -> Window:
        return self

    def apply(self, values: np.ndarray) -> np.ndarray:
        if not self.high > self.low:
            raise ValueError(f"empty intensity window [{self.low}, {self.high}]")
        out = (values.astype(np.float64) - self.low) / (self.high - self.low)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class PercentileWindow:
    """The [lo, hi] percentile range of the values it is resolved on (a constant image maps to 0)."""

    lo: float = 0.5
    hi: float = 99.5

    def resolve(self, values: np.ndarray) -> Window:
        a, b = np.percentile(values, [self.lo, self.hi])
        if b <= a:  # constant image: any window maps it to 0
            b = a + 1.0
        return Window(float(a), float(b))

    def apply(self, values: np.ndarray) -> np.ndarray:
        return self.resolve(values).apply(values)


WindowLike = Window | PercentileWindow
PRESETS: dict[str, WindowLike] = {
    "ct-brain": Window.from_center_width(40, 80),
    "ct-abdomen": Window.from_center_width(40, 400),
    "ct-lung": Window.from_center_width(-600, 1500),
    "mr-percentile": PercentileWindow(0.5, 99.5),
}
WINDOW_HELP = ("intensity window LO,HI in stored units (Hounsfield units for CT) mapped to [0, 1], e.g. -160,240 "
               "(default: 8-bit /255, 16-bit /65535, DICOM its own window, NIfTI the volume's 0.5-99.5 percentiles)")
PRESET_HELP = f"named window: {', '.join(PRESETS)} (CT: centre/width in HU; mr-percentile: 0.5-99.5 percentiles)"
MAX_SIDE_HELP = f"largest image side accepted, in pixels (default {MAX_SIDE}); larger scans are refused unless --downscale"
DOWNSCALE_HELP = "shrink scans larger than --max_side by an integer box filter on reading (masks alike) instead of refusing"


def parse_window(window: str | None = None, preset: str | None = None) -> WindowLike | None:
    """``--window LO,HI`` or ``--window_preset NAME`` (not both) as a window; None when neither is given."""
    if window and preset:
        raise ValueError(f"--window {window!r} and --window_preset {preset!r}: give one of them, not both")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"--window_preset {preset!r}: choose one of {list(PRESETS)}")
        return PRESETS[preset]
    if not window:
        return None
    parts = [p.strip() for p in str(window).split(",")]
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--window {window!r}: expected LO,HI (two numbers, e.g. -160,240)") from None
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"--window {window!r}: needs finite LO < HI")
    return Window(low, high)


@dataclass
class ScanReading:
    """How scans are read: window, size limit. Command configs include these fields (``negdpo <cmd> --help``)."""

    window: str | None = field(default=None, metadata={"help": WINDOW_HELP})
    window_preset: str | None = field(default=None, metadata={"help": PRESET_HELP})
    max_side: int = field(default=MAX_SIDE, metadata={"help": MAX_SIDE_HELP})
    downscale: bool = field(default=False, metadata={"help": DOWNSCALE_HELP})

    def __post_init__(self) -> None:
        self.reading()

    def reading(self) -> dict[str, Any]:
        """``ScanFolder`` keyword arguments (checked: a bad window or limit raises a one-line ValueError)."""
        return reading_options(self)


def reading_options(obj: Any) -> dict[str, Any]:
    """``ScanFolder`` keyword arguments from any object with (some of) the ``ScanReading`` attributes."""
    max_side = getattr(obj, "max_side", MAX_SIDE)
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side={max_side!r}: must be an integer >= 1")
    return {"window": parse_window(getattr(obj, "window", None), getattr(obj, "window_preset", None)),
            "max_side": max_side, "downscale": bool(getattr(obj, "downscale", False))}


def add_reading_args(parser: argparse.ArgumentParser) -> None:
    """The ``ScanReading`` options on an argparse command (dests: window, window_preset, max_side, downscale)."""
    g = parser.add_argument_group("reading scans")
    g.add_argument("--window", default=None, metavar="LO,HI", help=WINDOW_HELP)
    g.add_argument("--window_preset", default=None, choices=list(PRESETS), help=PRESET_HELP)
    g.add_argument("--max_side", type=int, default=MAX_SIDE, help=MAX_SIDE_HELP)
    g.add_argument("--downscale", action="store_true", help=DOWNSCALE_HELP)


def range_share(values: np.ndarray, full: float = 65535.0) -> float:
    """Share of the full range ``0..full`` that the values span (max - min) / full."""
    return float(values.max()) / full - float(values.min()) / full if values.size else 0.0
