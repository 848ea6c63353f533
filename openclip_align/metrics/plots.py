"""PNG figures of the modality gap. Each function writes one PNG and returns its path.

Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, so no
pyplot state or global backend is touched (safe on headless machines and inside other programs).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from ._arrays import check_pair, normalize_rows, subsample_indices
from .gap import paired_stats

IMAGE_COLOR, TEXT_COLOR = "tab:blue", "tab:orange"


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _subsample(image_features, text_features, max_points, seed):
    x, y = check_pair(image_features, text_features)
    idx = subsample_indices(len(x), max_points, seed)
    return normalize_rows(x[idx], "image_features"), normalize_rows(y[idx], "text_features")


def plot_gap_pca(image_features, text_features, path, max_points: int = 2000, seed: int = 0,
                 pair_lines: int = 30, title: Optional[str] = None, gap_axis: bool = False) -> str:
    """:func:`gap_pca_figure` written to ``path``."""
    return _save(gap_pca_figure(image_features, text_features, max_points, seed, pair_lines, title, gap_axis), path)


def gap_pca_figure(image_features, text_features, max_points: int = 2000, seed: int = 0, pair_lines: int = 30,
                   title: Optional[str] = None, gap_axis: bool = False):
    """2-D PCA (fit on both modalities together) with the centroid gap vector drawn as an arrow
    from the text centroid to the image centroid, and a few pairs joined by faint lines.

    ``gap_axis``: the x axis is the gap direction itself (mean(img) - mean(txt), normalised) and the y axis
    the first principal component of what is left, so the centroids lie exactly the centroid gap apart
    along x and figures of different models show their different gaps (plain PCA axes may hide them);
    both axes span [-1, 1] whatever the model. A given ``title`` is followed by the gap value."""
    from sklearn.decomposition import PCA

    stats = paired_stats(image_features, text_features)  # on all pairs
    gap = stats.centroid_gap
    xs, ys = _subsample(image_features, text_features, max_points, seed)
    both = np.vstack([xs, ys])
    if gap_axis and gap > 0:
        direction = stats.delta / np.linalg.norm(stats.delta)
        rest = both - np.outer(both @ direction, direction)
        second = PCA(n_components=1, random_state=seed).fit(rest)

        def project(v):
            along_gap = v @ direction
            return np.column_stack([along_gap, second.transform(v - np.outer(along_gap, direction))[:, 0]])

        along = float(np.var(both @ direction) / np.var(both, axis=0).sum())
        labels = (f"gap direction ({100 * along:.1f}% var.)",
                  f"PC1 of the rest ({100 * second.explained_variance_ratio_[0] * (1 - along):.1f}% var.)")
    else:
        pca = PCA(n_components=2, random_state=seed).fit(both)
        project = pca.transform
        ratio = pca.explained_variance_ratio_
        labels = (f"PC1 ({100 * ratio[0]:.1f}% var.)", f"PC2 ({100 * ratio[1]:.1f}% var.)")
    px, py = project(xs), project(ys)
    cx, cy = px.mean(axis=0), py.mean(axis=0)  # projection is affine, so these are projected centroids

    fig, (ax,) = _new_figure(6.0, 5.5)
    for i in range(min(pair_lines, len(px))):
        ax.plot([px[i, 0], py[i, 0]], [px[i, 1], py[i, 1]], color="0.6", lw=0.5, alpha=0.5, zorder=1)
    ax.scatter(px[:, 0], px[:, 1], s=8, alpha=0.6, color=IMAGE_COLOR, label="image", zorder=2)
    ax.scatter(py[:, 0], py[:, 1], s=8, alpha=0.6, color=TEXT_COLOR, label="text", zorder=2)
    ax.annotate("", xy=tuple(cx), xytext=tuple(cy), zorder=4,
                arrowprops=dict(arrowstyle="-|>", color="black", lw=2))
    ax.scatter(*zip(cx, cy), color="black", marker="x", s=60, zorder=5)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    gap_text = f"||mean(img) - mean(txt)|| = {gap:.3f}"
    ax.set_title(f"{title}\ncentroid gap {gap_text}" if title else f"Modality gap: {gap_text}")
    ax.legend(loc="best")
    if gap_axis:       # unit vectors project into [-1, 1]: one scale for every model, so pictures compare
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal", adjustable="box")
    else:
        ax.set_aspect("equal", adjustable="datalim")
    return fig


def plot_cosine_histograms(image_features, text_features, path, max_pairs: int = 5000, seed: int = 0,
                           unpaired_per_pair: int = 5, title: Optional[str] = None) -> str:
    """Histograms of cos(x_i, y_i) (paired) against cos(x_i, y_j), j != i (unpaired, sampled)."""
    xs, ys = _subsample(image_features, text_features, max_pairs, seed)
    n = len(xs)
    paired = np.einsum("ij,ij->i", xs, ys)
    perm = np.random.default_rng(seed).permutation(n)
    unpaired = []
    for offset in range(1, min(unpaired_per_pair, n - 1) + 1):  # perm[k] with perm[k + offset]: never i == j
        unpaired.append(np.einsum("ij,ij->i", xs[perm], ys[np.roll(perm, -offset)]))
    unpaired = np.concatenate(unpaired)

    fig, (ax,) = _new_figure(6.5, 4.0)
    lo, hi = float(min(paired.min(), unpaired.min())), float(max(paired.max(), unpaired.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 60)
    ax.hist(unpaired, bins=bins, density=True, alpha=0.55, color="0.5", label=f"unpaired (mean {unpaired.mean():.3f})")
    ax.hist(paired, bins=bins, density=True, alpha=0.65, color="tab:green", label=f"paired (mean {paired.mean():.3f})")
    ax.set_xlabel("cosine similarity image-text")
    ax.set_ylabel("density")
    ax.set_title(title or f"Paired vs unpaired cosines ({n} pairs)")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_lambda_sweep(sweep: Sequence[Dict[str, float]], path, title: Optional[str] = None) -> str:
    """Centroid gap (left) and retrieval / zero-shot accuracy (right) against the shift lambda."""
    if not sweep:
        raise ValueError("empty lambda sweep")
    rows = sorted(sweep, key=lambda r: r["lambda"])
    lams = [r["lambda"] for r in rows]
    fig, (ax_gap, ax_acc) = _new_figure(10.0, 4.0, ncols=2)
    ax_gap.plot(lams, [r["centroid_gap"] for r in rows], "o-", color="black")
    ax_gap.set_xlabel("lambda")
    ax_gap.set_ylabel("centroid gap ||delta||")
    ax_gap.axvline(0.5, ls="--", color="0.6", lw=1)
    metric_keys = [k for k in rows[0] if k not in ("lambda", "centroid_gap")]
    for key in metric_keys:
        ax_acc.plot(lams, [r[key] for r in rows], "o-", label=key)
    ax_acc.set_xlabel("lambda")
    ax_acc.set_ylabel("recall / accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.axvline(0.5, ls="--", color="0.6", lw=1)
    if metric_keys:
        ax_acc.legend(loc="best", fontsize=8)
    fig.suptitle(title or "Embedding shift x - lambda*delta, y + lambda*delta")
    return _save(fig, path)
