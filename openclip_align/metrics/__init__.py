"""Modality-gap metrics (definitions and sources: docs/methods.md).

Plots live in :mod:`openclip_align.metrics.plots` (imported on demand: it needs matplotlib).
"""
from .gap import (
    DEFAULT_MAX_PAIRS,
    PairedStats,
    alignment,
    alignment_score,
    centroid_gap,
    centroid_vector,
    centred_spectrum,
    effective_rank,
    feature_norm_stats,
    instance_gap,
    joint_uniformity,
    mean_intra_cosine,
    modality_gap_report,
    paired_stats,
    rmg,
    separability,
    top_variance_share,
    uniformity,
)
from .posthoc import (POSTHOC_KINDS, PosthocTransform, closing_lambda, fit_centring, fit_gap_shift,
                      fit_posthoc, fit_standardisation)
from .retrieval import classification_accuracy, retrieval_recall
from .shift import lambda_sweep, shift_embeddings

__all__ = [
    "DEFAULT_MAX_PAIRS", "PairedStats", "alignment", "alignment_score", "centroid_gap", "centroid_vector",
    "centred_spectrum", "effective_rank", "feature_norm_stats", "top_variance_share",
    "classification_accuracy", "instance_gap", "joint_uniformity", "lambda_sweep", "mean_intra_cosine",
    "modality_gap_report", "paired_stats", "retrieval_recall", "rmg", "separability", "shift_embeddings",
    "uniformity", "POSTHOC_KINDS", "PosthocTransform", "closing_lambda", "fit_centring", "fit_gap_shift",
    "fit_posthoc", "fit_standardisation",
]
