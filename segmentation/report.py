"""Summary statistics, the ablation report (``report.md`` + ``dice_bar.png``), per-image overlays and
``index.html``.

Per checkpoint, over scans with a lesion: mean ± std and a 95% percentile-bootstrap CI of the mean
(``n_boot`` resamples of images, seed 0) for each metric; HD95 over the images where it is defined;
the irrelevant-prompt control (Dice of the chain run with the control prompt, and the Pearson
correlation of the real and control saliency maps -- near 1 means the prompt does not steer the map);
empty coarse masks; on lesion-free scans, the false-positive rate (non-empty prediction). The raw saliency
map's own scores (``saliency_metrics``: lesion AUROC, AP, pointing game, partial correlation given local
brightness) for the real and the control prompt, in their own table.

Overlays (``write_overlay``): one labelled row image | saliency | coarse mask | ground truth |
prediction, the Dice on the prediction tile, a colour legend; small scans enlarged (nearest).
``index.html`` (``write_index``): a static page, every image with the overlays of all checkpoints
side by side, sortable by Dice (a few lines of inline JS, no server). User text (file names,
prompts, checkpoint names, paths) is escaped in both the markdown and the HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from negdpo.core.stats import bootstrap_ci

SALIENCY_METRICS = ("sal_auroc", "sal_ap", "sal_pointing", "sal_partial_r")  # saliency_metrics.COLUMNS
METRICS = ("dice", "iou", "nsd", "nsd_parity", "hd95", "coarse_dice", "control_dice", "control_saliency_corr",
           *SALIENCY_METRICS, *(f"control_{c}" for c in SALIENCY_METRICS))
LABELS = {"dice": "Dice", "iou": "IoU", "nsd": "NSD (2-D)", "nsd_parity": "NSD (parity)", "hd95": "HD95 px",
          "coarse_dice": "coarse Dice", "control_dice": "control Dice", "control_saliency_corr": "sal. corr.",
          "sal_auroc": "lesion AUROC", "sal_ap": "lesion AP", "sal_pointing": "pointing game",
          "sal_partial_r": "partial r given brightness"}


def describe(values: list[float], n_boot: int) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci95": [math.nan, math.nan]}
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "ci95": list(bootstrap_ci(arr, n_boot)[1:])}


def summarise(rows: list[dict[str, Any]], checkpoints: list[str], n_boot: int = 2000) -> dict[str, Any]:
    out: dict[str, Any] = {"checkpoints": {}}
    for name in checkpoints:
        mine = [r for r in rows if r["checkpoint"] == name]
        pos = [r for r in mine if r["positive"]]
        neg = [r for r in mine if not r["positive"]]
        stats = {m: describe([float(r.get(m, math.nan)) for r in pos], n_boot) for m in METRICS}
        delta = [r["dice"] - r["control_dice"] for r in pos if not math.isnan(r["control_dice"])]
        stats["dice_minus_control"] = describe(delta, n_boot)
        stats.update(
            n_images=len(mine), n_positive=len(pos), n_negative=len(neg),
            hd95_undefined=sum(1 for r in pos if math.isnan(r["hd95"])),
            empty_coarse=sum(r["empty_coarse"] for r in mine),
            dice_parity_mean=float(np.mean([round(r["dice"], 4) for r in pos])) if pos else math.nan,
            nsd_parity_mean=float(np.mean([round(r["nsd_parity"], 4) for r in pos])) if pos else math.nan,
            negatives_false_positive_rate=(float(np.mean([r["pred_area"] > 0 for r in neg])) if neg else math.nan))
        out["checkpoints"][name] = stats
    return out


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if not stat["n"]:
        return "–"
    lo, hi = stat["ci95"]
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""  # --bootstrap 0
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}{ci}"


def _saliency_section(ckpts: dict[str, dict[str, Any]]) -> list[str]:
    """The raw map's continuous scores (report prompt, then control prompt); nothing when no row has them."""
    if not any(s.get(c, {}).get("n") for s in ckpts.values() for c in SALIENCY_METRICS):
        return []
    lines = ["", "Saliency map before post-processing (no k-means or SAM; docs/method.md, saliency metrics), scans "
             "with a lesion, over the anatomy and the lesion: lesion AUROC (0.5 = chance; a prompt-blind map can score more, so compare with the control row), lesion AP (chance = the "
             "lesion's share), pointing game (the maximum within the NSD tolerance of the lesion), partial r given "
             "brightness (≈0: the map finds the lesion no better than local brightness does).", "",
             "| checkpoint | prompt | " + " | ".join(LABELS[c] for c in SALIENCY_METRICS) + " |",
             "|---" * (len(SALIENCY_METRICS) + 2) + "|"]
    for name, s in ckpts.items():
        for label, prefix in (("report", ""), ("control", "control_")):
            cells = [s.get(prefix + c) for c in SALIENCY_METRICS]
            if label == "control" and not any(c and c["n"] for c in cells):
                continue  # no control run
            lines.append(f"| {md_text(name)} | {label} | "
                         + " | ".join(_fmt(c) if c else "–" for c in cells) + " |")
    return lines


def bar_plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["checkpoints"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.6), dpi=120)
    series = [(key, label, color) for key, label, color in (("dice", "real prompt", "#3070b0"),
                                                            ("control_dice", "irrelevant prompt", "#c0a040"))
              if any(summary["checkpoints"][n][key]["n"] for n in names)]  # no control run: no bar, not a false 0
    width = 0.8 / max(1, len(series))
    for i, (key, label, color) in enumerate(series):
        off = (i - (len(series) - 1) / 2) * width
        stats = [summary["checkpoints"][n][key] for n in names]
        means = np.array([s["mean"] if s["n"] else 0.0 for s in stats])
        err = np.array([[m - s["ci95"][0], s["ci95"][1] - m] if s["n"] else [0, 0] for m, s in zip(means, stats)]).T
        err = np.clip(np.nan_to_num(err), 0.0, None)  # no CI (--bootstrap 0): no bar; a few-resample CI can miss
        # the mean, and matplotlib refuses negative bars
        bars = ax.bar(x + off, means, width=width, yerr=err, capsize=4, label=label, color=color)
        ax.bar_label(bars, labels=[f"{m:.3f}" if s["n"] else "–" for m, s in zip(means, stats)], fontsize=7,
                     padding=2)
    n_pos = [summary["checkpoints"][n]["n_positive"] for n in names]
    ax.set_xticks(x, [f"{n}\n(n={k})" for n, k in zip(names, n_pos)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (mean, 95% bootstrap CI)")
    ax.set_title("Zero-shot segmentation by checkpoint")
    if series:
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scans with a lesion: no Dice", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _overlay_section(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Links to every overlay, with the worst and best positive image of each checkpoint shown."""
    if not any(r.get("overlay_path") for r in rows):
        return []
    lines = ["## Per-image overlays", "",
             "[index.html](index.html): every image with the overlays of all checkpoints side by side, "
             "sortable by Dice. Each overlay: " + " \\| ".join(md_text(c) for c in OVERLAY_COLUMNS)
             + "; the ground truth is outlined in red on the prediction.", ""]
    for name in names:
        pos = [r for r in rows if r["checkpoint"] == name and r["positive"] and r.get("overlay_path")
               and not math.isnan(r["dice"])]
        if pos:
            worst, best = min(pos, key=lambda r: r["dice"]), max(pos, key=lambda r: r["dice"])
            for label, r in (("lowest", worst), ("highest", best))[: 1 if worst is best else 2]:
                lines += [f"{md_text(name)}, {label} Dice ({r['dice']:.3f}): {md_text(r['image'])}", "",
                          f"![{md_text(name)} {label} Dice]({url(r['overlay_path'])})", ""]
    by_image: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["checkpoint"]] = r
    lines += ["| image | " + " | ".join(f"Dice {md_text(n)}" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for image, per in by_image.items():
        cells = []
        for n in names:
            r = per.get(n)
            if r is None:
                cells.append("–")
                continue
            text = "–" if math.isnan(r["dice"]) else f"{r['dice']:.3f}"
            cells.append(f"[{text}]({url(r['overlay_path'])})" if r.get("overlay_path") else text)
        lines.append(f"| {md_text(image)} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> Path:
    """``report.md`` and ``dice_bar.png`` in ``out``; with ``rows`` (that have overlays) also ``index.html``
    and a linked overlay section."""
    cfg = summary.get("config", {})
    ckpts = summary["checkpoints"]
    m = md_text
    lines = ["# Zero-shot segmentation report", "",
             f"Data: {m(cfg.get('data'))} split {m(cfg.get('split'))}; saliency {m(cfg.get('saliency'))} "
             f"(align {m(cfg.get('align'))}), post-processing {m(cfg.get('post'))} (K={cfg.get('num_components')}, "
             f"ties {m(cfg.get('ties'))}), SAM {m(cfg.get('sam'))} ({m(cfg.get('sam_prompt'))} prompts); "
             f"NSD tolerance {cfg.get('tolerance')} px; code {m(summary.get('code_version'))}.", "",
             "Scans with a lesion; each cell: mean ± std [95% bootstrap CI of the mean]. "
             f"Control = the same chain with the irrelevant prompt “{m(cfg.get('control_prompt'))}”; "
             "sal. corr. = Pearson correlation of the real- and control-prompt saliency maps "
             "(≈1: the prompt does not steer the map).", ""]
    cols = ["dice", "iou", "nsd", "nsd_parity", "hd95", "coarse_dice", "control_dice", "control_saliency_corr"]
    lines.append("| checkpoint | n | " + " | ".join(LABELS[c] for c in cols) + " | Dice − control |")
    lines.append("|---" * (len(cols) + 3) + "|")
    for name, s in ckpts.items():
        cells = [_fmt(s[c], 2 if c == "hd95" else 3) for c in cols]
        lines.append(f"| {m(name)} | {s['n_positive']} | " + " | ".join(cells) + f" | {_fmt(s['dice_minus_control'])} |")
    lines += ["", "| checkpoint | Dice (parity, 4 d.p.) | NSD (parity, 4 d.p.) | empty coarse masks | "
              "HD95 undefined | lesion-free scans | false-positive rate on them |", "|---" * 7 + "|"]
    for name, s in ckpts.items():
        fp = s["negatives_false_positive_rate"]
        lines.append(f"| {m(name)} | {s['dice_parity_mean']:.4f} | {s['nsd_parity_mean']:.4f} | {s['empty_coarse']} | "
                     f"{s['hd95_undefined']} | {s['n_negative']} | {'–' if math.isnan(fp) else f'{fp:.3f}'} |")
    lines += _saliency_section(ckpts)
    skipped = summary.get("skipped") or []
    lines += ["", f"Skipped files: {len(skipped)}." + "".join(f"\n- {m(s['reason'])}" for s in skipped),
              "", "NSD (2-D) is the true boundary NSD; NSD (parity) reproduces the public implementation's "
              "1-pixel-slab surface Dice (close to a tolerant Dice; compare with published numbers only).",
              "", "![Dice by checkpoint](dice_bar.png)", ""]
    if rows:
        lines += _overlay_section(rows, list(ckpts))
        if any(r.get("overlay_path") for r in rows):
            write_index(out, rows, list(ckpts), title=f"{cfg.get('data')} ({cfg.get('split')})")
    bar_plot(out / "dice_bar.png", summary)
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- escaping --------------------------------------------------------------------------------------
_MD_SPECIAL = "\\`*_{}[]()#+!|~<>"


def md_text(text: Any) -> str:
    """User text as literal markdown: HTML-escaped, markdown punctuation backslash-escaped, one line."""
    out = html.escape(" ".join(str(text).split()), quote=False)
    return "".join("\\" + c if c in _MD_SPECIAL and c not in "<>" else c for c in out)


def url(rel_path: str | Path) -> str:
    """A relative file path as a URL (percent-encoded; safe in markdown links and HTML attributes)."""
    return quote(Path(rel_path).as_posix())


# -- overlays --------------------------------------------------------------------------------------
OVERLAY_COLUMNS = ("image", "saliency (red = high)", "coarse mask", "ground truth", "prediction")
GT_COLOR, COARSE_COLOR, PRED_COLOR = (1.0, 0.15, 0.15), (1.0, 0.85, 0.0), (0.1, 0.9, 0.2)
OVERLAY_LEGEND = (("ground truth (outline on the prediction)", GT_COLOR),
                  ("coarse mask (saliency clusters)", COARSE_COLOR), ("prediction (final mask)", PRED_COLOR))


def _edge(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of ``mask``, about 1/160 of the image side thick (>= 1 px): visible at any size."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    width = max(1, round(max(mask.shape) / 160))
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay_tiles(image: np.ndarray, sal: np.ndarray, coarse: np.ndarray, pred: np.ndarray,
                  gt: np.ndarray) -> list[np.ndarray]:
    """The five [0, 1] RGB tiles of an overlay row (see ``OVERLAY_COLUMNS``)."""
    import cv2
    from negdpo.core.imageio import to_rgb_uint8

    rgb = to_rgb_uint8(image).astype(np.float32) / 255.0
    heat = cv2.applyColorMap(np.clip(np.rint(np.asarray(sal) * 255), 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0

    def paint(base: np.ndarray, fill: np.ndarray | None, color: tuple, outline: np.ndarray | None = None,
              outline_color: tuple = GT_COLOR) -> np.ndarray:
        out = base.copy()
        if fill is not None:
            fill = np.asarray(fill, bool)
            out[fill] = 0.55 * out[fill] + 0.45 * np.asarray(color, np.float32)
            out[_edge(fill)] = color
        if outline is not None:
            out[_edge(outline)] = outline_color
        return out

    return [rgb, 0.45 * rgb + 0.55 * heat, paint(rgb, coarse, COARSE_COLOR), paint(rgb, gt, GT_COLOR),
            paint(rgb, pred, PRED_COLOR, outline=gt)]


def write_overlay(path: Path, image: np.ndarray, sal: np.ndarray, coarse: np.ndarray, pred: np.ndarray,
                  gt: np.ndarray, dice: float, title: str) -> Path:
    """One labelled overlay PNG: the five tiles, the Dice on the prediction, a legend, ``title`` on top."""
    from negdpo.core.figures import write_grid

    caption = "no lesion, empty prediction" if not np.any(gt) and not np.any(pred) else (
        "Dice –" if math.isnan(dice) else f"Dice {dice:.3f}")
    return write_grid(path, [overlay_tiles(image, sal, coarse, pred, gt)], column_labels=OVERLAY_COLUMNS,
                      tile_text=[[None, None, None, None, caption]], legend=OVERLAY_LEGEND, title=title)


# -- index.html ------------------------------------------------------------------------------------
_SORT_JS = """
document.querySelectorAll('th[data-sort]').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var key = function (tr) { var v = tr.cells[col].getAttribute('data-v'); return v === null ? tr.cells[col].textContent : v; };
    var num = th.getAttribute('data-sort') === 'num';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (num) { x = x === '' ? NaN : +x; y = y === '' ? NaN : +y;
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); } return asc ? x - y : y - x; }
      return asc ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""
_CSS = """body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:4px;vertical-align:top}
th[data-sort]{cursor:pointer;background:#eee}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ov img{width:100%;min-width:420px}td.prompt{max-width:16em;font-size:90%}"""


def write_index(out: Path, rows: list[dict[str, Any]], checkpoints: list[str], title: str = "") -> Path:
    """``index.html``: one row per image, Dice per checkpoint (sortable), the overlays side by side."""
    e = html.escape
    by_image: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["checkpoint"]] = r
    head = ['<th data-sort="text">image</th>', '<th data-sort="num">lesion px</th>',
            '<th data-sort="text">prompt</th>']
    head += [f'<th data-sort="num">Dice {e(c)}</th>' for c in checkpoints]
    head += [f"<th>overlay {e(c)}</th>" for c in checkpoints]
    body = []
    for image, per in by_image.items():
        first = next(iter(per.values()))
        cells = [f"<td>{e(image)}</td>", f'<td class="num">{int(first["gt_area"])}</td>',
                 f'<td class="prompt">{e(str(first.get("prompt", "")))}</td>']
        for c in checkpoints:
            d = per.get(c, {}).get("dice", math.nan)
            ok = isinstance(d, float | int) and math.isfinite(d)
            cells.append(f'<td class="num" data-v="{d:.6f}">{d:.3f}</td>' if ok else '<td class="num" data-v="">–</td>')
        for c in checkpoints:
            rel = per.get(c, {}).get("overlay_path", "")
            cells.append(f'<td class="ov"><a href="{e(url(rel))}"><img src="{e(url(rel))}" loading="lazy" '
                         f'alt="overlay {e(c)} {e(image)}"></a></td>' if rel else "<td>–</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    script_hash = base64.b64encode(hashlib.sha256(_SORT_JS.encode()).digest()).decode()
    csp = f"script-src 'sha256-{script_hash}'; object-src 'none'; base-uri 'none'"  # only our sort script runs
    page = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            f"<title>{e(title or 'Zero-shot segmentation')}: per-image overlays</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{e(title or 'Zero-shot segmentation')}: per-image overlays</h1>",
            "<p>Click a column header to sort (Dice: click again to reverse). Each overlay: "
            + " | ".join(e(c) for c in OVERLAY_COLUMNS) + "; ground truth outlined in red on the prediction. "
            'Summary: <a href="report.md">report.md</a>.</p>',
            "<table><thead><tr>" + "".join(head) + "</tr></thead><tbody>", *body, "</tbody></table>",
            f"<script>{_SORT_JS}</script>", "</body></html>", ""]
    path = out / "index.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(page), encoding="utf-8")
    tmp.replace(path)
    return path
