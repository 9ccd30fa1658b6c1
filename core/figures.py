"""Image grids a person can read: labelled columns and rows, text on tiles, a colour legend.

``write_grid(path, rows, column_labels=[...])`` saves rows of equally sized tiles ([0, 1] float or
uint8, grayscale or RGB) as one PNG. Small tiles are enlarged by an integer factor with nearest
neighbour (pixels stay pixels; 64 px -> 256 px), large ones shrunk to ``max_tile``. Text uses
DejaVu Sans from matplotlib's bundled fonts (PIL's bitmap font if that is missing). Same input,
same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imageio import to_uint8

BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
Color = tuple[float, float, float]


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px (PIL's default font if matplotlib's copy is unavailable)."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _rgb8(tile: np.ndarray) -> np.ndarray:
    arr = np.asarray(tile)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr[..., :3]


def tile_scale(size: int, min_tile: int = 256, max_tile: int = 512) -> float:
    """Display scale for a tile of ``size`` px: an integer enlargement up to about ``min_tile``, or a shrink
    to ``max_tile``."""
    if size > max_tile:
        return max_tile / size
    return float(max(1, round(min_tile / size)))


def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return right - left, bottom - top


def _fit(draw: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` px: the longest prefix that fits, found by binary
    search over the prefix length (O(log n) measurements of at most ``width`` px of text each)."""
    # a glyph is at least 1 px wide, so text longer than `width` characters never fits (and is not measured)
    if len(text) <= width and _text_size(draw, text, f)[0] <= width:
        return text
    lo, hi = 1, min(len(text) - 1, max(1, width))
    while lo < hi:  # the width of a prefix grows with its length
        mid = (lo + hi + 1) // 2
        if _text_size(draw, text[:mid] + "…", f)[0] <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def render_grid(rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str] | None = None,
                row_labels: Sequence[str] | None = None, *, tile_text: Sequence[Sequence[str | None]] | None = None,
                legend: Sequence[tuple[str, Color]] | None = None, title: str | None = None,
                min_tile: int = 256, max_tile: int = 512, pad: int = 4) -> np.ndarray:
    """The grid as an (H, W, 3) uint8 array (see ``write_grid``)."""
    if not rows or not any(len(r) for r in rows):
        raise ValueError("write_grid: no tiles")
    tiles = [[_rgb8(t) for t in row] for row in rows]
    h0, w0 = tiles[0][0].shape[:2]
    s = tile_scale(max(h0, w0), min_tile, max_tile)
    th, tw = max(1, round(h0 * s)), max(1, round(w0 * s))
    ncol = max(len(r) for r in tiles)
    fsize = max(12, min(22, tw // 14))
    f, fsmall = font(fsize), font(max(11, fsize - 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(probe, "Hg", f)[1] + fsize // 2
    left = 0
    if row_labels:
        left = min(tw, max(_text_size(probe, str(t)[:tw], f)[0] for t in row_labels) + 2 * pad)  # capped at tw
    top = (line + 2 * pad if title else 0) + (line + pad if column_labels else 0)
    legend_h = line + 2 * pad if legend else 0
    width = left + ncol * (tw + pad) + pad
    height = top + len(tiles) * (th + pad) + pad + legend_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), _fit(draw, title, f, width - 2 * pad), fill=TEXT, font=f)
        y += line + 2 * pad
    if column_labels:
        for j, label in enumerate(column_labels[:ncol]):
            text = _fit(draw, str(label), f, tw)
            x = left + pad + j * (tw + pad) + (tw - _text_size(draw, text, f)[0]) // 2
            draw.text((x, y), text, fill=TEXT, font=f)
    resample = Image.Resampling.NEAREST if s >= 1 else Image.Resampling.LANCZOS
    for i, row in enumerate(tiles):
        y0 = top + pad + i * (th + pad)
        if row_labels and i < len(row_labels):
            text = _fit(draw, str(row_labels[i]), f, left - pad)
            draw.text((pad, y0 + (th - line) // 2), text, fill=TEXT, font=f)
        for j, tile in enumerate(row):
            x0 = left + pad + j * (tw + pad)
            canvas.paste(Image.fromarray(tile).resize((tw, th), resample), (x0, y0))
            text = tile_text[i][j] if tile_text and i < len(tile_text) and j < len(tile_text[i]) else None
            if text:
                text = _fit(draw, text, fsmall, tw - 8)
                bw, bh = _text_size(draw, text, fsmall)
                draw.rectangle((x0, y0, x0 + bw + 8, y0 + bh + 10), fill=(0, 0, 0))
                draw.text((x0 + 4, y0 + 3), text, fill=(255, 255, 255), font=fsmall)
    if legend:
        x, y = left + pad, height - legend_h + pad
        box = line - pad
        for label, color in legend:
            unit = all(c <= 1 for c in color)  # [0, 1] colours; otherwise 0-255
            rgb = tuple(int(round(c * 255)) if unit else int(c) for c in color)
            draw.rectangle((x, y + 2, x + box, y + 2 + box), fill=rgb, outline=TEXT)
            draw.text((x + box + pad, y), label, fill=TEXT, font=fsmall)
            x += box + 3 * pad + _text_size(draw, label, fsmall)[0] + 2 * pad
    return np.asarray(canvas)


def write_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], column_labels: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None, *, tile_text: Sequence[Sequence[str | None]] | None = None,
               legend: Sequence[tuple[str, Color]] | None = None, title: str | None = None,
               min_tile: int = 256, max_tile: int = 512, pad: int = 4) -> Path:
    """Save rows of tiles as one labelled PNG (atomically); returns the path.

    ``rows``: lists of tiles, each resized to the first tile's size. ``column_labels`` / ``row_labels``:
    text above the columns / left of the rows. ``tile_text[i][j]``: a caption drawn on tile (i, j), e.g.
    ``"Dice 0.83"``. ``legend``: (label, RGB colour, all in [0, 1] or 0-255) swatches under the grid.
    """
    path = Path(path)
    canvas = render_grid(rows, column_labels, row_labels, tile_text=tile_text, legend=legend, title=title,
                         min_tile=min_tile, max_tile=max_tile, pad=pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)
    return path
