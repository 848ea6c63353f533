"""Closing the modality gap after training, without any training: three post-hoc transforms.

Each is fitted on paired embeddings (e.g. a model's *training* pairs) and then applied to any other
embeddings of the same model (held-out pairs, zero-shot images, class-prompt texts: images get the image
side, texts the text side). Inputs are L2-normalised first; every transform has the form

    u' = normalise((u - offset) / scale)           (offset, scale: per modality, per dimension)

* ``centre`` (Zhang et al., ICLR 2023, "Diagnosing and rectifying vision models using language"):
  offset = the modality's mean embedding, scale = 1.
* ``standardise`` (I0T, 2024): offset = the modality's mean, scale = its per-dimension standard deviation
  (population std, so the fitted pairs have std exactly 1 per dimension before re-normalisation; a
  dimension constant on the fitted pairs keeps scale 1).
* ``shift`` (Liang et al., NeurIPS 2022, "Mind the Gap"): images move by -lambda * delta, texts by
  +lambda * delta, delta = mean(x) - mean(y) of the fitted pairs, at the lambda of :func:`closing_lambda`.

``renormalise=False`` returns the transformed rows before the final normalisation (where the closed forms
hold exactly: zero centroids for ``centre`` on the fitted pairs, equal centroids for ``shift``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._arrays import as_matrix, check_pair, like_input, normalize_rows

POSTHOC_KINDS = ("centre", "standardise", "shift")


@dataclass(frozen=True)
class PosthocTransform:
    """Per-modality offset and scale (each a float64 vector of the embedding dimension)."""

    kind: str
    image_offset: np.ndarray
    text_offset: np.ndarray
    image_scale: np.ndarray
    text_scale: np.ndarray
    lam: Optional[float] = None          # the shift's lambda (``shift`` only)
    fitted_pairs: int = 0

    def image(self, features, renormalise: bool = True):
        return self._apply(features, self.image_offset, self.image_scale, "image features", renormalise)

    def text(self, features, renormalise: bool = True):
        return self._apply(features, self.text_offset, self.text_scale, "text features", renormalise)

    def apply(self, image_features, text_features, renormalise: bool = True):
        return self.image(image_features, renormalise), self.text(text_features, renormalise)

    def _apply(self, features, offset, scale, name: str, renormalise: bool):
        u = as_matrix(features, name)
        if u.shape[1] != offset.shape[0]:
            raise ValueError(f"{name} have dim {u.shape[1]} but the {self.kind} transform was fitted on dim "
                             f"{offset.shape[0]} (embeddings of another model?)")
        out = (normalize_rows(u, name) - offset) / scale
        if renormalise:
            try:
                out = normalize_rows(out, f"{self.kind}-transformed {name}")
            except ValueError as err:        # a row sat exactly on the offset
                raise ValueError(f"{err}: the row equals the transform's offset") from None
        return like_input(out, features)


def _fitted_stats(image_features, text_features):
    x, y = check_pair(image_features, text_features)
    x, y = normalize_rows(x, "image_features"), normalize_rows(y, "text_features")
    return x, y, x.mean(axis=0), y.mean(axis=0)


def fit_centring(image_features, text_features) -> PosthocTransform:
    """Subtract each modality's mean (of the normalised fitted rows)."""
    x, y, mean_x, mean_y = _fitted_stats(image_features, text_features)
    ones = np.ones(x.shape[1])
    return PosthocTransform("centre", mean_x, mean_y, ones, ones.copy(), fitted_pairs=x.shape[0])


def fit_standardisation(image_features, text_features) -> PosthocTransform:
    """Subtract each modality's mean and divide by its per-dimension (population) standard deviation."""
    x, y, mean_x, mean_y = _fitted_stats(image_features, text_features)
    std_x, std_y = x.std(axis=0), y.std(axis=0)
    return PosthocTransform("standardise", mean_x, mean_y, np.where(std_x > 0, std_x, 1.0),
                            np.where(std_y > 0, std_y, 1.0), fitted_pairs=x.shape[0])


def closing_lambda(delta, target_delta=None) -> float:
    """The lambda whose shift along ``delta`` best closes the centroid gap ``target_delta`` before
    re-normalisation.

    Shifting images by -lambda * delta and texts by +lambda * delta moves the difference of the centroids
    from ``target_delta`` to ``target_delta - 2 lambda delta``; its norm is smallest at
    lambda = <target_delta, delta> / (2 ||delta||^2). On the pairs delta was measured on (``target_delta``
    None: the same delta) that is 1/2, and the un-normalised centroids then coincide exactly.
    """
    delta = np.asarray(delta, dtype=np.float64).reshape(-1)
    target = delta if target_delta is None else np.asarray(target_delta, dtype=np.float64).reshape(-1)
    norm_sq = float(delta @ delta)
    if norm_sq == 0.0:
        raise ValueError("the gap vector is zero: there is no gap to close along it")
    return float(target @ delta) / (2.0 * norm_sq)


def fit_gap_shift(image_features, text_features, lam: Optional[float] = None) -> PosthocTransform:
    """Mind the Gap's shift along delta = mean(x) - mean(y) of the fitted pairs, at ``lam`` (default: the
    closing lambda, 1/2)."""
    x, y, mean_x, mean_y = _fitted_stats(image_features, text_features)
    delta = mean_x - mean_y
    lam = closing_lambda(delta) if lam is None else float(lam)
    ones = np.ones(x.shape[1])
    return PosthocTransform("shift", lam * delta, -lam * delta, ones, ones.copy(), lam=lam, fitted_pairs=x.shape[0])


FITTERS = {"centre": fit_centring, "standardise": fit_standardisation, "shift": fit_gap_shift}


def fit_posthoc(kind: str, image_features, text_features) -> PosthocTransform:
    """One of :data:`POSTHOC_KINDS`, fitted on the given pairs."""
    try:
        fitter = FITTERS[kind]
    except KeyError:
        raise ValueError(f"unknown post-hoc transform {kind!r}; known: {', '.join(POSTHOC_KINDS)}") from None
    return fitter(image_features, text_features)
