"""The study's training-curve figures (the per-image CSVs: negdpo.core.tables.write_csv)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def plot_curves(logs: dict[str, Path], out: Path, keys: tuple[str, ...], title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional and slow to import: only when a figure is drawn

    series = {}
    for name, path in logs.items():
        if path.exists():
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            series[name] = recs
    if not series:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.4))
    axes = np.atleast_1d(axes)
    colors = {name: f"C{i}" for i, name in enumerate(series)}  # one colour per run in every panel
    for ax, key in zip(axes, keys):
        for name, recs in series.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and np.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, color=colors[name], lw=1.2)
        if key == "loss" and all(v > 0 for recs in series.values() for r in recs if (v := r.get(key)) is not None):
            ax.set_yscale("log")  # SFT (MSE) and DPO losses differ by orders of magnitude
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
