"""Modality-gap metrics on paired image/text embeddings (definitions and sources: docs/methods.md).

Inputs are torch tensors or numpy arrays, rows L2-normalised here. Everything that is linear in N
(centroid gap, instance gap, alignment, cones, RMG) is computed exactly on all rows in one streaming
float64 pass, using closed forms such as
``mean_{i!=j} cos(u_i, u_j) = (||sum_i u_i||^2 - sum_i ||u_i||^2) / (N (N - 1))``.
Only the terms with no closed form (uniformity, separability) use a seeded subsample of at most
``max_pairs`` pairs, processed in row blocks so that no N x N matrix is ever built.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ._arrays import (BLOCK_ROWS, check_pair, check_single, iter_normalized_blocks, normalize_rows,
                      subsample_indices)

DEFAULT_MAX_PAIRS = 5000
# Above this many multiply-adds a Gram block is formed in float32 (twice as fast; cosines to ~1e-7);
# below it float64 is cheap and used.
_FLOAT64_GRAM_LIMIT = 2e8
# Elements per Gram block (float64): 4M elements = 32 MB.
_BLOCK_ELEMENTS = 1 << 22
RMG_MIN_PAIRED_DISTANCE = 1e-3
# Squared singular values below this fraction of the largest are rounding noise (singular values 1e-6 below).
_SPECTRUM_RELATIVE_FLOOR = 1e-12  # the floor on m in Schrodi et al.'s RMG


# --- exact O(N d) statistics -------------------------------------------------------------------
@dataclass(frozen=True)
class PairedStats:
    """Sufficient statistics of the linear-in-N metrics, gathered in one pass over the pairs."""

    n: int
    dim: int
    sum_x: np.ndarray  # sum of normalised image rows (float64)
    sum_y: np.ndarray
    sq_norm_x: float  # sum of squared norms of the normalised rows (N up to rounding)
    sq_norm_y: float
    sum_cos: float  # sum_i cos(x_i, y_i)
    sum_dist: float  # sum_i ||x_i - y_i||
    sum_sq_dist: float  # sum_i ||x_i - y_i||^2

    @property
    def delta(self) -> np.ndarray:
        return (self.sum_x - self.sum_y) / self.n

    @property
    def centroid_gap(self) -> float:
        return float(np.linalg.norm(self.delta))

    @property
    def centroid_gap_sq_per_dim(self) -> float:
        """||delta||^2 / d: what CLIP-Refine's code logs as the gap (``mse_loss(mean_img, mean_txt)``)."""
        return float(self.delta @ self.delta) / self.dim

    @property
    def instance_gap(self) -> float:
        return self.sum_dist / self.n

    @property
    def alignment_score(self) -> float:
        return self.sum_cos / self.n

    @property
    def alignment(self) -> float:
        return self.sum_sq_dist / self.n

    @property
    def cone_image(self) -> float:
        return _mean_offdiag_cos(self.sum_x, self.sq_norm_x, self.n)

    @property
    def cone_text(self) -> float:
        return _mean_offdiag_cos(self.sum_y, self.sq_norm_y, self.n)

    @property
    def rmg(self) -> float:
        m = max((1.0 - self.alignment_score) / 2.0, RMG_MIN_PAIRED_DISTANCE)
        intra_x = (1.0 - self.cone_image) / 2.0  # mean_{i!=j} d(x_i, x_j), d = (1 - cos) / 2
        intra_y = (1.0 - self.cone_text) / 2.0
        return m / (m + 0.5 * (intra_x + intra_y))


def _mean_offdiag_cos(total: np.ndarray, sq_norms: float, n: int) -> float:
    return float((total @ total - sq_norms) / (n * (n - 1)))


def paired_stats(image_features, text_features) -> PairedStats:
    """One streaming float64 pass over the pairs; memory is O(block x d), not O(N d)."""
    x, y = check_pair(image_features, text_features)
    n, d = x.shape
    sum_x = np.zeros(d)
    sum_y = np.zeros(d)
    sq_x = sq_y = s_cos = s_dist = s_sq = 0.0
    for (start, xb), (_, yb) in zip(iter_normalized_blocks(x, "image_features"),
                                    iter_normalized_blocks(y, "text_features")):
        sum_x += xb.sum(axis=0)
        sum_y += yb.sum(axis=0)
        sq_x += float(np.einsum("ij,ij->", xb, xb))
        sq_y += float(np.einsum("ij,ij->", yb, yb))
        s_cos += float(np.einsum("ij,ij->", xb, yb))
        diff_sq = np.einsum("ij,ij->i", xb - yb, xb - yb)
        s_dist += float(np.sqrt(diff_sq).sum())
        s_sq += float(diff_sq.sum())
    return PairedStats(n, d, sum_x, sum_y, sq_x, sq_y, s_cos, s_dist, s_sq)


def centroid_vector(image_features, text_features) -> np.ndarray:
    """delta = mean(X) - mean(Y) of the normalised rows (float64)."""
    return paired_stats(image_features, text_features).delta


def centroid_gap(image_features, text_features) -> float:
    """||mean(X) - mean(Y)|| (Liang et al.), not the squared or per-dimension version."""
    return paired_stats(image_features, text_features).centroid_gap


def instance_gap(image_features, text_features) -> float:
    """mean_i ||x_i - y_i||."""
    return paired_stats(image_features, text_features).instance_gap


def alignment_score(image_features, text_features) -> float:
    """mean_i cos(x_i, y_i)."""
    return paired_stats(image_features, text_features).alignment_score


def alignment(image_features, text_features) -> float:
    """Wang & Isola alignment: mean_i ||x_i - y_i||^2 (= 2 - 2 * alignment score)."""
    return paired_stats(image_features, text_features).alignment


def mean_intra_cosine(features) -> float:
    """The "cone": mean_{i!=j} cos(u_i, u_j), exact in O(N d) from the sum of the normalised rows."""
    u = check_single(features)
    total = np.zeros(u.shape[1])
    sq = 0.0
    for _, block in iter_normalized_blocks(u, "features"):
        total += block.sum(axis=0)
        sq += float(np.einsum("ij,ij->", block, block))
    return _mean_offdiag_cos(total, sq, u.shape[0])


def rmg(image_features, text_features) -> float:
    """Relative modality gap (Schrodi et al.), exact on all pairs via the closed-form intra means."""
    return paired_stats(image_features, text_features).rmg


# --- dimensional collapse: effective rank of each modality ----------------------------------------
def centred_spectrum(features, name: str = "features") -> np.ndarray:
    """Squared singular values (descending) of the mean-centred, L2-normalised rows, exact on all N rows.

    Two streaming passes: the mean, then the d x d scatter sum_i (u_i - mu)(u_i - mu)^T, whose
    eigenvalues are the squared singular values of the centred N x d matrix. O(N d^2) time, O(d^2 + block x d)
    memory, never an N x N matrix.
    """
    u = check_single(features, name)
    d = u.shape[1]
    total = np.zeros(d)
    for _, block in iter_normalized_blocks(u, name):
        total += block.sum(axis=0)
    mean = total / u.shape[0]
    scatter = np.zeros((d, d))
    dtype = _gram_dtype(u.shape[0], d, d)       # float32 products above 2e8 multiply-adds, summed in float64
    for _, block in iter_normalized_blocks(u, name):
        centred = (block - mean).astype(dtype, copy=False)
        scatter += centred.T @ centred
    eigenvalues = np.linalg.eigvalsh(scatter)[::-1]
    # Rounding leaves eigenvalues of order eps * largest (even negative ones) where the data has none;
    # they would count as directions after the square root, so below that floor they are zero.
    floor = _SPECTRUM_RELATIVE_FLOOR * max(float(eigenvalues[0]), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def effective_rank_from_spectrum(squared_singular_values: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the singular values normalised to sum 1.

    0.0 when nothing is left after centring (every row the same direction).
    """
    sigma = np.sqrt(np.asarray(squared_singular_values, dtype=np.float64))
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def top_variance_share(squared_singular_values: np.ndarray, k: int = 2) -> float:
    """Share of the centred variance in the top ``k`` principal components (1.0 when nothing is left)."""
    lam = np.sort(np.asarray(squared_singular_values, dtype=np.float64))[::-1]
    total = lam.sum()
    return float(lam[:k].sum() / total) if total > 0 else 1.0


def effective_rank(features) -> float:
    """Effective rank of the mean-centred, L2-normalised embeddings (1 .. dim; about k for rank-k data)."""
    return effective_rank_from_spectrum(centred_spectrum(features))


def feature_norm_stats(image_features, text_features) -> dict:
    """Statistics of UNnormalised features, for callers that have them (training evaluation, ``gap``).

    ``mean_norm_image`` / ``mean_norm_text``: mean L2 norm of the raw rows (HyCD's effective inverse
    temperature is their product); ``centroid_gap_sq_per_dim_raw``: ||mean(raw X) - mean(raw Y)||^2 / d,
    the gap as CLIP-Refine's training log reports it.
    """
    x, y = check_pair(image_features, text_features)
    n, d = x.shape
    sums = {"x": np.zeros(d), "y": np.zeros(d)}
    norms = {"x": 0.0, "y": 0.0}
    for start in range(0, n, BLOCK_ROWS):
        for key, matrix in (("x", x), ("y", y)):
            block = np.asarray(matrix[start:start + BLOCK_ROWS], dtype=np.float64)
            if not np.isfinite(block).all():
                raise ValueError(f"{'image' if key == 'x' else 'text'}_features contains NaN or inf")
            sums[key] += block.sum(axis=0)
            norms[key] += float(np.linalg.norm(block, axis=1).sum())
    return norm_stats_from_sums(n, norms["x"], norms["y"], sums["x"], sums["y"])


def norm_stats_from_sums(n: int, norm_sum_x: float, norm_sum_y: float, sum_x: np.ndarray, sum_y: np.ndarray) -> dict:
    """:func:`feature_norm_stats` from running sums (row count, sums of raw norms, sums of raw rows)."""
    delta = (np.asarray(sum_x, dtype=np.float64) - np.asarray(sum_y, dtype=np.float64)) / n
    return {"mean_norm_image": float(norm_sum_x) / n, "mean_norm_text": float(norm_sum_y) / n,
            "centroid_gap_sq_per_dim_raw": float(delta @ delta) / delta.size}


# --- subsampled O(N^2) terms ---------------------------------------------------------------------
def _gram_dtype(n_rows: int, n_cols: int, dim: int):
    return np.float64 if n_rows * n_cols * dim <= _FLOAT64_GRAM_LIMIT else np.float32


def _gaussian_kernel(gram: np.ndarray) -> np.ndarray:
    """exp(-2 ||u_i - u_j||^2) for unit vectors, where ||u_i - u_j||^2 = 2 - 2 cos."""
    return np.exp(4.0 * gram.astype(np.float64, copy=False) - 4.0)


def _kernel_sum_upper(u: np.ndarray) -> float:
    """sum_{i<j} exp(-2 ||u_i - u_j||^2), in row blocks over the upper triangle only."""
    n, d = u.shape
    uc = u.astype(_gram_dtype(n, n, d), copy=False)
    step = max(1, _BLOCK_ELEMENTS // n)
    total = 0.0
    for a in range(0, n, step):
        b = min(n, a + step)
        kern = _gaussian_kernel(uc[a:b] @ uc[a:].T)  # rows a..b-1 against columns a..n-1
        total += float(np.triu(kern[:, :b - a], k=1).sum()) + float(kern[:, b - a:].sum())
    return total


def _kernel_sum_cross(u: np.ndarray, v: np.ndarray) -> float:
    """sum_{i,j} exp(-2 ||u_i - v_j||^2), in row blocks."""
    n, d = u.shape
    dtype = _gram_dtype(n, v.shape[0], d)
    uc, vc = u.astype(dtype, copy=False), v.astype(dtype, copy=False)
    step = max(1, _BLOCK_ELEMENTS // v.shape[0])
    return float(sum(_gaussian_kernel(uc[a:a + step] @ vc.T).sum() for a in range(0, n, step)))


def _log_mean_upper(kernel_sum: float, n: int) -> float:
    return math.log(kernel_sum / (n * (n - 1) / 2))


def _uniformity_normalized(u: np.ndarray) -> float:
    return _log_mean_upper(_kernel_sum_upper(u), u.shape[0])


def _joint_uniformity_normalized(x: np.ndarray, y: np.ndarray, upper_x=None, upper_y=None) -> float:
    # The union's Gram matrix is [[XX, XY], [YX, YY]]: its strict upper triangle is the upper
    # triangles of XX and YY plus all of XY, which avoids forming the 2n x 2n matrix (and lets
    # the report reuse the per-modality sums).
    upper_x = _kernel_sum_upper(x) if upper_x is None else upper_x
    upper_y = _kernel_sum_upper(y) if upper_y is None else upper_y
    return _log_mean_upper(upper_x + upper_y + _kernel_sum_cross(x, y), x.shape[0] + y.shape[0])


def uniformity(features, max_rows=DEFAULT_MAX_PAIRS, seed: int = 0) -> float:
    """Wang & Isola uniformity log mean_{i<j} exp(-2 ||u_i - u_j||^2) on a seeded subsample.

    ``max_rows=None`` uses every row (exact; O(N^2 d) time, O(block x N) memory).
    """
    u = check_single(features)
    idx = subsample_indices(u.shape[0], max_rows, seed)
    return _uniformity_normalized(normalize_rows(u[idx]))


def joint_uniformity(image_features, text_features, max_pairs=DEFAULT_MAX_PAIRS, seed: int = 0) -> float:
    """Uniformity of the union of both modalities (same pair subsample for both)."""
    x, y = check_pair(image_features, text_features)
    idx = subsample_indices(x.shape[0], max_pairs, seed)
    return _joint_uniformity_normalized(normalize_rows(x[idx], "image_features"),
                                        normalize_rows(y[idx], "text_features"))


def _separability_normalized(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = x.shape[0]
    # Split by pair, so that an image and its own caption never sit on both sides of the split.
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, int(round(0.2 * n))))
    test, train = perm[:n_test], perm[n_test:]

    def stack(rows):
        feats = np.vstack([x[rows], y[rows]]).astype(np.float32)
        labels = np.r_[np.zeros(len(rows), dtype=int), np.ones(len(rows), dtype=int)]
        return feats, labels

    clf = LogisticRegression(max_iter=1000, random_state=seed)
    with warnings.catch_warnings():  # an unconverged probe still gives a meaningful accuracy
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(*stack(train))
    return float(clf.score(*stack(test)))


def separability(image_features, text_features, seed: int = 0, max_pairs=DEFAULT_MAX_PAIRS) -> float:
    """Held-out accuracy of a logistic regression telling image from text embeddings.

    80/20 split of (a seeded subsample of) the pairs; 0.5 = indistinguishable, 1.0 = separated.
    """
    x, y = check_pair(image_features, text_features)
    idx = subsample_indices(x.shape[0], max_pairs, seed)
    return _separability_normalized(normalize_rows(x[idx], "image_features"),
                                    normalize_rows(y[idx], "text_features"), seed)


# --- everything at once ------------------------------------------------------------------------
def modality_gap_report(image_features, text_features, seed: int = 0, max_pairs=DEFAULT_MAX_PAIRS,
                        with_separability: bool = True) -> dict:
    """All section-3 metrics of paired embeddings as a flat dict of floats/ints.

    Exact on all N pairs: centroid_gap (||delta||), centroid_gap_sq_per_dim (||delta||^2 / d, CLIP-Refine's
    convention), instance_gap, alignment_score, alignment, cone_image, cone_text, rmg, and per modality
    effective_rank_* and top2_variance_share_* (dimensional collapse). On a seeded subsample of ``n_subsampled = min(N, max_pairs)`` pairs:
    uniformity_image/text/joint and separability (``max_pairs=None``: all pairs).
    """
    stats = paired_stats(image_features, text_features)
    x, y = check_pair(image_features, text_features)
    idx = subsample_indices(stats.n, max_pairs, seed)
    xs = normalize_rows(x[idx], "image_features")
    ys = normalize_rows(y[idx], "text_features")
    upper_x, upper_y = _kernel_sum_upper(xs), _kernel_sum_upper(ys)
    spectrum_x, spectrum_y = centred_spectrum(x, "image_features"), centred_spectrum(y, "text_features")
    report = {
        "centroid_gap": stats.centroid_gap,
        "centroid_gap_sq_per_dim": stats.centroid_gap_sq_per_dim,
        "instance_gap": stats.instance_gap,
        "alignment_score": stats.alignment_score,
        "alignment": stats.alignment,
        "uniformity_image": _log_mean_upper(upper_x, len(idx)),
        "uniformity_text": _log_mean_upper(upper_y, len(idx)),
        "uniformity_joint": _joint_uniformity_normalized(xs, ys, upper_x, upper_y),
        "rmg": stats.rmg,
        "separability": _separability_normalized(xs, ys, seed) if with_separability else float("nan"),
        "cone_image": stats.cone_image,
        "cone_text": stats.cone_text,
        "effective_rank_image": effective_rank_from_spectrum(spectrum_x),
        "effective_rank_text": effective_rank_from_spectrum(spectrum_y),
        "top2_variance_share_image": top_variance_share(spectrum_x, 2),
        "top2_variance_share_text": top_variance_share(spectrum_y, 2),
        "n_pairs": stats.n,
        "n_subsampled": int(len(idx)),
        "dim": stats.dim,
    }
    return report
