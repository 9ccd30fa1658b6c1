"""Quality report of a pair build, written next to the data (``OUT/report/``).

* ``report.md`` / ``report.json``: rows per kind and split, dropped, failed and skipped counts, the
  most common generator prompts, score and margin statistics per ``gen_model``, and on phantoms the
  mean error of chosen/rejected against the healthy twin (inside the mask, outside it) per
  ``gen_model``. User text (paths, file names, prompts, model names) is escaped for markdown/HTML;
* ``scores.png``: histograms of score_chosen / score_rejected and of the margin per gen_model;
* ``pairs_grid.png``: random generator pairs, one per row: source | mask | chosen | rejected (| twin).

    python -m negdpo.preference.pairs.report OUT
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .card import md_escape
from .schema import KINDS, SPLITS, dataset_dir


def _arr(img) -> np.ndarray:
    a = np.asarray(img)
    return a.astype(np.float32) / 255.0


def _twin_errors(rows, root: Path | None) -> dict[str, dict[str, float]]:
    """Mean |x - twin| inside / outside the mask for chosen and rejected, per gen_model (phantoms)."""
    if root is None:
        return {}
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        f = Path(r["file"])
        twin_path = root / f.parent.name.replace("_images", "_twins") / f"{f.stem}.png"
        if not twin_path.is_file():
            continue
        from negdpo.core.imageio import read_scan, to_gray

        twin = read_scan(twin_path)
        m = _arr(r["mask"]) > 0.5
        for col in ("chosen", "rejected"):
            x = _arr(r[col])
            x = to_gray(x) if x.ndim == 3 and twin.ndim == 2 else x
            err = np.abs(x - twin)
            acc[r["gen_model"]][f"{col}_in"].append(float(err[m].mean()) if m.any() else 0.0)
            acc[r["gen_model"]][f"{col}_out"].append(float(err[~m].mean()) if (~m).any() else 0.0)
    return {g: {k: round(float(np.mean(v)), 5) for k, v in d.items()} | {"n": len(d["chosen_in"])}
            for g, d in acc.items()}


def write_report(out: str | Path, n_grid: int = 8, seed: int = 0) -> Path:
    """Write OUT/report/{report.md,report.json,scores.png,pairs_grid.png}; returns report.md."""
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from negdpo.core.figures import write_grid

    out = Path(out)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    summary_path = out / "build_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    root = Path(summary.get("config", {}).get("data", "")) if summary else None
    root = root if root is not None and root.is_dir() else None
    info: dict = {"rows": {}, "dropped": summary.get("dropped", {}), "failed": summary.get("failed", []),
                  "skipped_files": summary.get("skipped_files", []), "by_gen_model": {}}
    gen_rows = []
    for kind in KINDS:
        path = Path(dataset_dir(str(out), kind))
        if not path.is_dir():
            continue
        dsd = datasets.load_from_disk(str(path))
        info["rows"][kind] = {s: len(d) for s, d in dsd.items()}
        if kind == "generator":
            gen_rows = [r for d in dsd.values() for r in d]
    by_model: dict[str, list] = defaultdict(list)
    for r in gen_rows:
        by_model[r["gen_model"]].append(r)
    twin = _twin_errors(gen_rows, root)
    info["top_prompts"] = Counter(r["prompt"] for r in gen_rows).most_common(5)
    for g, rows in by_model.items():
        sc = np.array([r["score_chosen"] for r in rows])
        sr = np.array([r["score_rejected"] for r in rows])
        info["by_gen_model"][g] = {
            "pairs": len(rows), "score_chosen_mean": round(float(sc.mean()), 5),
            "score_rejected_mean": round(float(sr.mean()), 5), "margin_mean": round(float((sc - sr).mean()), 5),
            "margin_median": round(float(np.median(sc - sr)), 5),
            "difficulty_buckets": {int(b): int(n) for b, n in zip(*np.unique([r["difficulty_bucket"] for r in rows],
                                                                               return_counts=True))},
            "twin_error": twin.get(g)}
    # histograms
    if by_model:
        fig, axes = plt.subplots(len(by_model), 2, figsize=(9, 3 * len(by_model)), squeeze=False)
        for (g, rows), (a0, a1) in zip(by_model.items(), axes):
            sc = np.array([r["score_chosen"] for r in rows])
            sr = np.array([r["score_rejected"] for r in rows])
            bins = np.linspace(min(sc.min(), sr.min()), max(sc.max(), sr.max()) + 1e-6, 25)
            a0.hist(sc, bins, alpha=0.6, label="chosen")
            a0.hist(sr, bins, alpha=0.6, label="rejected")
            a0.set_title(f"{g}: scores (n={len(rows)})", fontsize=9)
            a0.legend(fontsize=8)
            a1.hist(sc - sr, 25, color="tab:green")
            a1.set_title(f"{g}: margin chosen - rejected", fontsize=9)
        fig.tight_layout()
        fig.savefig(rep / "scores.png", dpi=100)
        plt.close(fig)
    # grid of random pairs
    if gen_rows:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(gen_rows), size=min(n_grid, len(gen_rows)), replace=False)
        grid = []
        for i in sorted(pick):
            r = gen_rows[int(i)]
            tiles = [_arr(r[c]) for c in ("source", "mask", "chosen", "rejected")]
            f = Path(r["file"])
            tp = root / f.parent.name.replace("_images", "_twins") / f"{f.stem}.png" if root else None
            if tp is not None and tp.is_file():
                from negdpo.core.imageio import read_scan

                tiles.append(read_scan(tp))
            grid.append(tiles)
        labels = ["source", "mask", "chosen", "rejected", "healthy twin"][: max(len(r) for r in grid)]
        write_grid(rep / "pairs_grid.png", grid, column_labels=labels)
    (rep / "report.json").write_text(json.dumps(info, indent=1))
    lines = [f"# Pair build report: {md_escape(out.name)}", "", "## Rows", "", "| kind | " + " | ".join(SPLITS) + " |",
             "| --- |" + " --- |" * len(SPLITS)]
    for kind, c in info["rows"].items():
        lines.append(f"| {kind} | " + " | ".join(str(c.get(s, 0)) for s in SPLITS) + " |")
    dropped = ", ".join(f"{md_escape(k)}: {v}" for k, v in sorted(info["dropped"].items())) or "none"
    lines += ["", f"Dropped (scans, by reason): {dropped}",
              f"Failed scans (not done, retried by a rerun): {len(info['failed'])}"]
    lines += [f"- {md_escape(f['item'])}: {md_escape(f['reason'])}" for f in info["failed"]]
    lines += [f"Skipped input files: {len(info['skipped_files'])}"]
    lines += [f"- {md_escape(s['reason'])}" for s in info["skipped_files"]]
    lines += ["", "Most common generator prompts:"] + [f"- {n} x {md_escape(t)}" for t, n in info["top_prompts"]]
    lines += ["", "## Generator pairs by gen_model", "",
              "| gen_model | pairs | score chosen | score rejected | margin (mean / median) | twin err in: chosen / rejected | twin err out: chosen / rejected |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for g, s in info["by_gen_model"].items():
        t = s["twin_error"] or {}
        tin = f"{t.get('chosen_in', float('nan')):.4f} / {t.get('rejected_in', float('nan')):.4f}" if t else "n/a"
        tout = f"{t.get('chosen_out', float('nan')):.4f} / {t.get('rejected_out', float('nan')):.4f}" if t else "n/a"
        lines.append(f"| {md_escape(g)} | {s['pairs']} | {s['score_chosen_mean']:.4f} | {s['score_rejected_mean']:.4f} | "
                     f"{s['margin_mean']:.4f} / {s['margin_median']:.4f} | {tin} | {tout} |")
    lines += ["", "![scores](scores.png)", "", "Random pairs: source | mask | chosen | rejected (| healthy twin)",
              "", "![pairs](pairs_grid.png)", ""]
    md = rep / "report.md"
    md.write_text("\n".join(lines))
    return md


def _main(argv: list[str]) -> int:
    from negdpo.core.console import CommandParser

    p = CommandParser(description="Write the quality report of a build-pairs output folder.")
    p.add_argument("out", help="a build-pairs output folder")
    out = Path(p.parse_args(argv).out)
    if not out.is_dir():  # write_report would create it and report an empty build
        raise FileNotFoundError(f"{out}: no such folder (expected a build-pairs output folder)")
    print(write_report(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """User errors: one line and exit 2 (``--debug``: the traceback)."""
    from negdpo.core.console import run_main

    return run_main("python -m negdpo.preference.pairs.report", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
