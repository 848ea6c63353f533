"""Modality-gap metrics next to upstream's retrieval metrics at evaluation (``--gap-metrics``).

Upstream's ``evaluate`` hands its L2-normalised features to the retrieval metrics; :func:`add_gap_metrics`
adds the gap report of the same features under ``gap/``, and :class:`RawFeatureTally`, fed by
:func:`tallying_eval_forward` during evaluation's forward passes, adds the statistics of the raw ones.
"""
from __future__ import annotations

import logging
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .run_state import TrainerRun


def add_gap_metrics(run: TrainerRun, metrics: dict, image_features, text_features) -> dict:
    """``metrics`` with ``gap/NAME`` entries (finite numbers only); a failure is logged, never raised:
    evaluation runs before the epoch's checkpoint is saved."""
    if not run.args.gap_metrics or len(image_features) < 2:
        return metrics
    try:
        from openclip_align.metrics import modality_gap_report

        report = modality_gap_report(image_features, text_features, seed=0, max_pairs=run.args.gap_max_pairs)
    except Exception:  # evaluation runs before the epoch's checkpoint is saved: never lose it
        logging.exception("openclip-align: modality-gap metrics failed; continuing without them")
        return metrics
    report.update(run.raw_tally.pop_stats(len(image_features)))
    for key, value in report.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            metrics[f"gap/{key}"] = float(value)
    return metrics


class RawFeatureTally:
    """Count, sum of norms and sum of the raw features that evaluation's forward passes produce.

    Upstream's evaluation only sees L2-normalised features; the mean raw norms (HyCD's effective inverse
    temperature is their product) and the gap on raw features (CLIP-Refine's training-log convention)
    need the unnormalised ones. Sums stay on the device and are read once, when the metrics are made.
    """

    def __init__(self):
        self.sums: Dict[str, list] = {}

    def add(self, modality: str, raw: torch.Tensor) -> None:
        raw = raw.detach().float()
        count, norms, total = self.sums.get(modality, (0, 0.0, 0.0))
        self.sums[modality] = (count + raw.shape[0], norms + raw.norm(dim=-1).sum(), total + raw.sum(dim=0))

    def pop_stats(self, n_pairs: int) -> Dict[str, float]:
        """``mean_norm_image``, ``mean_norm_text``, ``centroid_gap_sq_per_dim_raw``; empty unless both
        modalities saw exactly ``n_pairs`` rows (another forward path, or a partial pass)."""
        sums, self.sums = self.sums, {}
        if set(sums) != {"image", "text"} or any(sums[m][0] != n_pairs for m in sums):
            return {}
        from openclip_align.metrics.gap import norm_stats_from_sums

        (n, norm_x, sum_x), (_, norm_y, sum_y) = sums["image"], sums["text"]
        return norm_stats_from_sums(n, float(norm_x), float(norm_y), sum_x.double().cpu().numpy(),
                                    sum_y.double().cpu().numpy())


def tallying_eval_forward(model: nn.Module, upstream_forward, tally: RawFeatureTally):
    """In evaluation, let the forward's own encode_image/encode_text calls also record raw statistics;
    training is untouched. The features returned are exactly upstream's."""
    encoders = {"image": model.encode_image, "text": model.encode_text}

    def tallying(modality):
        def encode(x, normalize: bool = False):
            raw = encoders[modality](x, normalize=False)
            tally.add(modality, raw)
            return F.normalize(raw, dim=-1) if normalize else raw
        return encode

    def forward(*args, **kwargs):
        if model.training:
            return upstream_forward(*args, **kwargs)
        own = {name: model.__dict__.get(name) for name in ("encode_image", "encode_text")}
        model.encode_image, model.encode_text = tallying("image"), tallying("text")
        try:
            return upstream_forward(*args, **kwargs)
        finally:
            for name, previous in own.items():
                if previous is None:
                    del model.__dict__[name]
                else:
                    setattr(model, name, previous)

    return forward
