"""t-SNE (scikit-learn) of lesion vs background patch features, before and after training."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def lesion_background_points(tokens: np.ndarray, patch_masks: np.ndarray, max_points: int = 600,
                             threshold: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of lesion (label 1: coverage >= threshold) and background (0: coverage 0) patches.

    tokens (N, P, D), patch_masks (N, P). Background is subsampled to at most ``max_points`` // 2 ... with
    lesion patches kept preferentially (they are rare).
    """
    d = tokens.shape[-1]
    flat, m = tokens.reshape(-1, d), patch_masks.reshape(-1)
    les, bg = np.flatnonzero(m >= threshold), np.flatnonzero(m <= 0)
    rng = np.random.default_rng(seed)
    n_les = min(len(les), max_points // 2)
    les = rng.choice(les, n_les, replace=False)
    bg = rng.choice(bg, min(len(bg), max_points - n_les), replace=False)
    idx = np.concatenate([les, bg])
    return flat[idx], np.concatenate([np.ones(len(les), int), np.zeros(len(bg), int)])


def separation_score(features: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette score (cosine) of the lesion/background split in feature space (-1..1, higher = apart)."""
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(silhouette_score(features, labels, metric="cosine"))


def plot_tsne(panels: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, seed: int = 0) -> dict[str, float]:
    """One t-SNE panel per entry {title: (features, labels)}; saves a PNG, returns silhouette per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    scores = {}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (title, (x, y)) in zip(axes[0], panels.items()):
        scores[title] = separation_score(x, y)
        emb = TSNE(n_components=2, perplexity=min(30.0, max(5.0, (len(x) - 1) / 3)), init="pca",
                   random_state=seed).fit_transform(x.astype(np.float64))
        for lab, color, name in ((0, "tab:blue", "background"), (1, "tab:red", "lesion")):
            sel = y == lab
            ax.scatter(emb[sel, 0], emb[sel, 1], s=6, c=color, alpha=0.6, label=f"{name} ({sel.sum()})")
        ax.set_title(f"{title}  silhouette={scores[title]:.3f}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Patch features: lesion vs background (t-SNE)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return scores
