"""Zero-shot classification: class-name prompts -> text classifier (OpenCLIP's own builder) -> top-K.

A class set is a JSON file ``{"classnames": [...], "templates": ["a photo of a {}.", ...]}``; the
images to classify come from a CSV with ``filepath`` and integer ``label`` columns
(:class:`~openclip_align.evaluation.readers.CsvImages`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch

from ..metrics.retrieval import classification_accuracy
from .features import _unwrap


def load_classnames(path) -> Tuple[List[str], List[str]]:
    """(classnames, templates) from a class-set JSON, validated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-set JSON not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            spec = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or "classnames" not in spec:
        raise ValueError(f'{path}: expected an object {{"classnames": [...], "templates": [...]}}')
    classnames = spec["classnames"]
    templates = spec.get("templates") or ["a photo of a {}."]
    if not classnames or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"{path}: 'classnames' must be a non-empty list of strings")
    if not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"{path}: every template must be a string containing '{{}}' for the class name")
    return list(classnames), list(templates)


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device="cpu",
                         num_classes_per_batch: int = 10, progress: bool = False) -> torch.Tensor:
    """D x C classifier (normalised mean of the prompt embeddings per class), float32 on CPU.

    Calls :func:`open_clip.build_zero_shot_classifier`, so prompts are built exactly as OpenCLIP does.
    """
    import open_clip

    model = _unwrap(model)
    model.eval()
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                                   num_classes_per_batch=num_classes_per_batch,
                                                   device=device, use_tqdm=progress)
    return weights.float().cpu()


def zero_shot_accuracy(image_features, classifier, labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-K accuracy (``{"top1": ..., "top5": ...}``) of images against a D x C classifier, the
    layout :func:`zero_shot_classifier` and OpenCLIP return."""
    weights = classifier.detach().cpu().T if hasattr(classifier, "detach") else classifier.T
    return classification_accuracy(image_features, weights, labels, ks=ks)
