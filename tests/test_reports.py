"""Reports a person can read and trust: labelled grids and overlays, escaped user text, a sortable index."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from negdpo.core.figures import render_grid, write_grid
from negdpo.core.imageio import save_png
from PIL import Image

COLOR_A, COLOR_B = (7, 200, 99), (201, 3, 77)  # colours no text, background or legend uses


def _checker(n: int = 64) -> np.ndarray:
    tile = np.zeros((n, n, 3), np.uint8)
    odd = (np.add.outer(np.arange(n), np.arange(n)) % 2).astype(bool)
    tile[odd], tile[~odd] = COLOR_A, COLOR_B
    return tile


def _count(canvas: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.all(canvas == np.asarray(color, np.uint8), axis=-1).sum())


def test_small_tiles_enlarged_nearest_to_readable_size():
    canvas = render_grid([[_checker(64)]])
    # 64 px -> x4 nearest: every source pixel becomes exactly 16 pixels of its own colour
    assert _count(canvas, COLOR_A) == _count(canvas, COLOR_B) == 64 * 64 // 2 * 16
    big = render_grid([[_checker(1024)]], max_tile=512)  # large scans are shrunk, not enlarged
    assert big.shape[0] < 600 and big.shape[1] < 600


def test_labels_captions_and_legend_are_drawn():
    tile = _checker(64)
    plain = render_grid([[tile, tile]])
    labelled = render_grid([[tile, tile]], column_labels=["image", "prediction"], row_labels=["case 1"],
                           legend=[("ground truth", (1.0, 0.0, 0.0))])
    assert labelled.shape[0] > plain.shape[0] + 20 and labelled.shape[1] > plain.shape[1]  # header, legend, labels
    assert _count(labelled, (255, 0, 0)) > 50  # the legend swatch
    assert _count(labelled, COLOR_A) == _count(plain, COLOR_A)  # labels never cover a tile
    captioned = render_grid([[tile, tile]], tile_text=[[None, "Dice 0.500"]])
    ys, xs = np.nonzero(np.any(captioned != plain, axis=-1))
    assert len(ys) > 0 and ys.max() - ys.min() < 40 and xs.min() > 256  # a small box on the second tile only
    assert not np.array_equal(captioned, render_grid([[tile, tile]], tile_text=[[None, "Dice 0.900"]]))


def test_write_grid_same_bytes_and_phantoms_alias(tmp_path):
    from negdpo.core import phantoms

    assert phantoms.write_grid is write_grid  # kept importable from core.phantoms
    rows = [[np.linspace(0, 1, 48 * 48).reshape(48, 48), np.ones((48, 48), bool)]]
    a = write_grid(tmp_path / "a.png", rows, column_labels=["x", "y"], title="t")
    b = write_grid(tmp_path / "b.png", rows, column_labels=["x", "y"], title="t")
    assert a.read_bytes() == b.read_bytes() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="no tiles"):
        write_grid(tmp_path / "c.png", [])


def test_overlay_shows_dice_legend_and_enlarged_tiles(tmp_path):
    from negdpo.segmentation.report import OVERLAY_COLUMNS, write_overlay

    image = np.full((64, 64), 0.5, np.float32)
    gt = np.zeros((64, 64), bool)
    gt[20:40, 20:40] = True
    pred = np.zeros_like(gt)
    pred[24:44, 24:44] = True
    path = write_overlay(tmp_path / "o.png", image, gt.astype(np.float32), gt, pred, gt, 0.64, title="a.png")
    canvas = np.asarray(Image.open(path))
    assert canvas.shape[1] >= len(OVERLAY_COLUMNS) * 256  # five tiles of at least 256 px
    # the untouched grey of the image tile: 64x64 source pixels x 16 (nearest x4), in the first tile alone
    assert _count(canvas, (128, 128, 128)) >= 64 * 64 * 16
    other = np.asarray(Image.open(write_overlay(tmp_path / "p.png", image, gt.astype(np.float32), gt, pred, gt,
                                                0.91, title="a.png")))
    assert not np.array_equal(canvas, other)  # the Dice is printed on the picture


def _tiny_folder(root, names, prompts):
    for i, name in enumerate(names):
        img = np.zeros((24, 24), np.float32)
        mask = np.zeros((24, 24), bool)
        mask[4 + i:12 + i, 6:14] = True
        img[mask] = 0.8
        save_png(root / "test_images" / name, img)
        save_png(root / "test_masks" / name, mask)
    (root / "prompts.json").write_text(json.dumps(dict(zip(names, prompts))))


def test_user_text_is_escaped_in_report_and_index(tmp_path):
    from negdpo.segmentation.evaluate import evaluate

    evil_name = "<img src=x onerror=alert(1)>.png"
    evil_prompt = "<script>alert('prompt')</script> | *bold* [link](javascript:x)"
    data = tmp_path / "<script>data"
    _tiny_folder(data, [evil_name, "plain.png"], [evil_prompt, "a tumour"])
    out = tmp_path / "eval"
    evaluate(data, {"oracle": "tiny"}, out, saliency="oracle", sam="none", bootstrap=10,
             control_prompt="<script>alert('control')</script>")
    page = (out / "index.html").read_text()
    assert page.count("<script") == 1 and "<img src=x" not in page  # only the page's own sort script
    assert "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in page and "&lt;img src=x" in page
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", page)  # an injected inline script would not run
    overlay = next(p for p in (out / "overlays").iterdir() if p.name.startswith("<img"))
    assert overlay.is_file() and 'src="overlays/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png"' in page
    report = (out / "report.md").read_text()
    assert "<script" not in report and "<img" not in report
    assert "&lt;script&gt;data" in report and "&lt;script&gt;alert\\('control'\\)&lt;/script&gt;" in report
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;.png" in report  # markdown punctuation escaped too
    assert "(overlays/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png)" in report  # links percent-encoded


def test_md_text():
    from negdpo.segmentation.report import md_text

    assert md_text("a|b <script>*x*\n[y](z)") == "a\\|b &lt;script&gt;\\*x\\* \\[y\\]\\(z\\)"
