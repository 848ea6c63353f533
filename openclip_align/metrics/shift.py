"""Embedding shift along the gap vector (Liang et al., "Mind the Gap") and a sweep over lambda.

Moving images by -lambda * delta and texts by +lambda * delta (then re-normalising) changes the
distance between the modality centroids without retraining; lambda = 0.5 makes the un-normalised
centroids coincide, i.e. closes the gap to first order. The sweep shows what that does to retrieval
and zero-shot accuracy.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ._arrays import as_matrix, check_pair, like_input, normalize_rows
from .gap import paired_stats
from .retrieval import classification_accuracy, retrieval_recall


def _shift(features: np.ndarray, step: np.ndarray, name: str) -> np.ndarray:
    shifted = normalize_rows(features, name) + step
    try:
        return normalize_rows(shifted, f"shifted {name}")
    except ValueError as err:  # a point moved exactly onto the origin
        raise ValueError(f"{err}: the shift moved an embedding onto the origin; use another lambda") from None


def shift_embeddings(x, y, lam: float, delta=None):
    """x' = normalise(x - lam * delta), y' = normalise(y + lam * delta) on L2-normalised x, y.

    ``delta`` defaults to mean(x) - mean(y) of the (paired) inputs; pass a precomputed gap vector
    to shift other embeddings (e.g. class-name text embeddings) consistently. Returns torch tensors
    for torch inputs, float64 numpy arrays otherwise.
    """
    if delta is None:
        xa, ya = check_pair(x, y, min_rows=1)
        delta = paired_stats(xa, ya).delta if len(xa) >= 2 else normalize_rows(xa)[0] - normalize_rows(ya)[0]
    else:
        xa, ya = as_matrix(x, "x"), as_matrix(y, "y")
    delta = np.asarray(delta.detach().cpu() if hasattr(delta, "detach") else delta, dtype=np.float64).reshape(-1)
    for name, a in (("x", xa), ("y", ya)):
        if a.shape[1] != delta.shape[0]:
            raise ValueError(f"{name} has dim {a.shape[1]} but delta has dim {delta.shape[0]}")
    lam = float(lam)
    return (like_input(_shift(xa, -lam * delta, "x"), x),
            like_input(_shift(ya, lam * delta, "y"), y))


def lambda_sweep(image_features, text_features, lambdas: Sequence[float], class_text_features=None,
                 labels=None, class_image_features=None, ks: Sequence[int] = (1,)) -> List[Dict[str, float]]:
    """For each lambda: centroid gap and retrieval R@K of the shifted pairs, and zero-shot top-1/top-5.

    Zero-shot needs ``class_text_features`` (classes x dim, one text embedding per class) and
    ``labels``; the images classified are ``class_image_features`` if given (e.g. a separate
    classification set), else the paired images. All shifts use the gap vector delta of the
    un-shifted pairs, images moving by -lambda * delta and class texts by +lambda * delta.
    """
    x, y = check_pair(image_features, text_features)
    if (class_text_features is None) != (labels is None):
        raise ValueError("zero-shot in the sweep needs both class_text_features and labels")
    if class_image_features is not None and labels is None:
        raise ValueError("class_image_features given without labels/class_text_features")
    delta = paired_stats(x, y).delta
    cls_images = x if class_image_features is None else as_matrix(class_image_features, "class_image_features")
    rows = []
    for lam in lambdas:
        xs, ys = shift_embeddings(x, y, lam, delta=delta)
        row = {"lambda": float(lam), "centroid_gap": paired_stats(xs, ys).centroid_gap}
        row.update(retrieval_recall(xs, ys, ks=ks))
        if class_text_features is not None:
            ci, ct = shift_embeddings(cls_images, class_text_features, lam, delta=delta)
            acc = classification_accuracy(ci, ct, labels, ks=(1, 5))
            row["zero_shot_top1"], row["zero_shot_top5"] = acc["top1"], acc["top5"]
        rows.append(row)
    return rows
