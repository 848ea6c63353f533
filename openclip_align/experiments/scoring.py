"""Quality numbers of one trained model on the embedded default's evaluation sets, and of its embeddings
after each post-hoc gap-closing transform (:mod:`openclip_align.metrics.posthoc`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from openclip_align.evaluation import CsvImages, embed_images, embed_pairs, load_classnames
from openclip_align.evaluation import zero_shot_accuracy, zero_shot_classifier
from openclip_align.metrics import feature_norm_stats, modality_gap_report, retrieval_recall
from openclip_align.metrics.posthoc import POSTHOC_KINDS, PosthocTransform, fit_posthoc

GAP_KEYS = ("alignment_score", "centroid_gap", "centroid_gap_sq_per_dim", "rmg", "uniformity_joint", "separability",
            "effective_rank_image", "effective_rank_text", "top2_variance_share_image", "top2_variance_share_text")


def load_model(model_name: str, checkpoint: Path, device: str):
    import open_clip

    from openclip_align.model_loading import create_model_for_command

    model, _, preprocess = create_model_for_command(model_name, str(checkpoint), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


@dataclass
class Embedded:
    """One checkpoint's embeddings of every evaluation set (what :func:`score` needs), L2-normalised except
    the held-out pairs, which keep their raw features for the norm statistics."""
    heldout_raw: Tuple[torch.Tensor, torch.Tensor]
    crossstyle: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    zeroshot: Dict[str, tuple] = field(default_factory=dict)      # set -> (image features, labels, D x C classifier)
    train: Optional[Tuple[torch.Tensor, torch.Tensor]] = None     # the training pairs (post-hoc statistics)


def embed_model(model_name: str, checkpoint: Path, data_dir: Path, device: str = "cpu", batch_size: int = 256,
                with_train: bool = False) -> Embedded:
    """Embed the held-out, cross-style and zero-shot sets once (and the training pairs ``with_train``)."""
    model, preprocess, tokenizer = load_model(model_name, checkpoint, device)
    with torch.inference_mode():
        def pairs(csv: Path, normalize: bool = True):
            return embed_pairs(model, preprocess, tokenizer, str(csv), batch_size=batch_size, device=device,
                               progress=False, normalize=normalize)

        out = Embedded(heldout_raw=pairs(data_dir / "heldout.csv", normalize=False))
        if (data_dir / "crossstyle.csv").exists():
            out.crossstyle = pairs(data_dir / "crossstyle.csv")
        for classes in sorted((data_dir / "zeroshot").glob("*.json")):
            classnames, templates = load_classnames(classes)
            features, labels = embed_images(model, preprocess, CsvImages(classes.with_suffix(".csv")),
                                            batch_size=batch_size, device=device, progress=False)
            classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
            out.zeroshot[classes.stem] = (features, labels, classifier)
        if with_train:
            out.train = pairs(data_dir / "train.csv")
    return out


def score(embedded: Embedded, transform: Optional[PosthocTransform] = None, plot_path: Optional[Path] = None,
          plot_title: Optional[str] = None) -> Dict[str, float]:
    """Gap metrics + retrieval on held-out pairs, retrieval on cross-style pairs, zero-shot top-1; with a
    post-hoc ``transform``, of the transformed embeddings (images: its image side; captions and class
    prompts: its text side; no raw-norm statistics, the transform has no raw features)."""
    out: Dict[str, float] = {}
    raw_image, raw_text = embedded.heldout_raw
    if transform is None:
        out.update(feature_norm_stats(raw_image, raw_text))
    image, text = F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1)
    if transform is not None:
        image, text = transform.apply(image, text)
    report = modality_gap_report(image, text, seed=0)
    out.update({key: float(report[key]) for key in GAP_KEYS})
    out.update(retrieval_recall(image, text, ks=(1, 5)))
    if plot_path is not None:
        from openclip_align.metrics.plots import plot_gap_pca

        plot_gap_pca(image, text, plot_path, title=plot_title or "held-out pairs", gap_axis=True)
    if embedded.crossstyle is not None:
        c_image, c_text = embedded.crossstyle if transform is None else transform.apply(*embedded.crossstyle)
        recall = retrieval_recall(c_image, c_text, ks=(1,))
        out["crossstyle_image_to_text_R@1"] = recall["image_to_text_R@1"]
        out["crossstyle_text_to_image_R@1"] = recall["text_to_image_R@1"]
        held = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
        out["crossstyle_drop_R@1"] = held - (recall["image_to_text_R@1"] + recall["text_to_image_R@1"]) / 2
    for name, (features, labels, classifier) in embedded.zeroshot.items():
        if transform is not None:        # the classifier's columns are the class-prompt text embeddings
            features, classifier = transform.image(features), transform.text(classifier.T).T
        out[f"zeroshot_{name}_top1"] = zero_shot_accuracy(features, classifier, labels, ks=(1,))["top1"]
    return out


def evaluate_model(model_name: str, checkpoint: Path, data_dir: Path, device: str = "cpu",
                   plot_path: Optional[Path] = None, batch_size: int = 256,
                   plot_title: Optional[str] = None) -> Dict[str, float]:
    """Gap metrics + retrieval on held-out pairs, retrieval on cross-style pairs, zero-shot top-1; with
    ``plot_path``, the held-out pairs drawn along their gap direction (titled ``plot_title`` and the gap)."""
    embedded = embed_model(model_name, checkpoint, data_dir, device=device, batch_size=batch_size)
    return score(embedded, plot_path=plot_path, plot_title=plot_title or model_name)


def evaluate_with_posthoc(model_name: str, checkpoint: Path, data_dir: Path, kinds=POSTHOC_KINDS,
                          device: str = "cpu", plot_paths: Optional[Dict[Optional[str], Path]] = None,
                          plot_titles: Optional[Dict[Optional[str], str]] = None,
                          batch_size: int = 256) -> Dict[Optional[str], Dict[str, float]]:
    """:func:`evaluate_model` of the checkpoint (key None) and of each post-hoc transform in ``kinds``
    (key: the kind), every transform fitted on the checkpoint's own embeddings of ``DATA/train.csv`` only.
    The model is run once per set; the transforms cost seconds."""
    plot_paths, plot_titles = plot_paths or {}, plot_titles or {}
    embedded = embed_model(model_name, checkpoint, data_dir, device=device, batch_size=batch_size,
                           with_train=bool(kinds))
    out = {None: score(embedded, plot_path=plot_paths.get(None), plot_title=plot_titles.get(None, model_name))}
    for kind in kinds:
        transform = fit_posthoc(kind, *embedded.train)
        out[kind] = score(embedded, transform, plot_path=plot_paths.get(kind), plot_title=plot_titles.get(kind))
    return out


def plot_heldout_gap(model_name: str, checkpoint: Path, data_dir: Path, path: Path, title: str,
                     device: str = "cpu", batch_size: int = 256) -> Path:
    """Only the held-out pair picture of :func:`evaluate_model` (to redraw it for a finished run)."""
    from openclip_align.metrics.plots import plot_gap_pca

    model, preprocess, tokenizer = load_model(model_name, checkpoint, device)
    with torch.inference_mode():
        image, text = embed_pairs(model, preprocess, tokenizer, str(data_dir / "heldout.csv"), batch_size=batch_size,
                                  device=device, progress=False)
    return Path(plot_gap_pca(image, text, path, title=title, gap_axis=True))


def metric_time_100k(dim: int = 768, n: int = 100_000, seed: int = 0) -> float:
    """Seconds for one modality_gap_report on n random paired embeddings (the metrics' speed target)."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, dim), dtype=np.float32)
    text = image + rng.standard_normal((n, dim), dtype=np.float32)
    start = time.perf_counter()
    modality_gap_report(image, text, seed=0)
    return time.perf_counter() - start
