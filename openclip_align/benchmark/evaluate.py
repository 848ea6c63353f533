"""Quality numbers of one trained model on the embedded default's evaluation sets."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from openclip_align.evaluation import CsvImages, embed_images, embed_pairs, load_classnames
from openclip_align.evaluation import zero_shot_accuracy, zero_shot_classifier
from openclip_align.metrics import feature_norm_stats, modality_gap_report, retrieval_recall

GAP_KEYS = ("alignment_score", "centroid_gap", "centroid_gap_sq_per_dim", "rmg", "uniformity_joint", "separability",
            "effective_rank_image", "effective_rank_text", "top2_variance_share_image", "top2_variance_share_text")


def load_model(model_name: str, checkpoint: Path, device: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def evaluate_model(model_name: str, checkpoint: Path, data_dir: Path, device: str = "cpu",
                   plot_path: Optional[Path] = None, batch_size: int = 256,
                   plot_title: Optional[str] = None) -> Dict[str, float]:
    """Gap metrics + retrieval on held-out pairs, retrieval on cross-style pairs, zero-shot top-1; with
    ``plot_path``, the held-out pairs drawn along their gap direction (titled ``plot_title`` and the gap)."""
    model, preprocess, tokenizer = load_model(model_name, checkpoint, device)
    out: Dict[str, float] = {}
    with torch.inference_mode():
        raw_image, raw_text = embed_pairs(model, preprocess, tokenizer, str(data_dir / "heldout.csv"),
                                          batch_size=batch_size, device=device, progress=False, normalize=False)
        out.update(feature_norm_stats(raw_image, raw_text))
        image, text = torch.nn.functional.normalize(raw_image, dim=-1), torch.nn.functional.normalize(raw_text, dim=-1)
        report = modality_gap_report(image, text, seed=0)
        out.update({key: float(report[key]) for key in GAP_KEYS})
        out.update(retrieval_recall(image, text, ks=(1, 5)))
        if plot_path is not None:
            from openclip_align.metrics.plots import plot_gap_pca

            plot_gap_pca(image, text, plot_path, title=plot_title or model_name, gap_axis=True)
        cross = data_dir / "crossstyle.csv"
        if cross.exists():
            c_image, c_text = embed_pairs(model, preprocess, tokenizer, str(cross), batch_size=batch_size,
                                          device=device, progress=False)
            recall = retrieval_recall(c_image, c_text, ks=(1,))
            out["crossstyle_image_to_text_R@1"] = recall["image_to_text_R@1"]
            out["crossstyle_text_to_image_R@1"] = recall["text_to_image_R@1"]
            held = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
            out["crossstyle_drop_R@1"] = held - (recall["image_to_text_R@1"] + recall["text_to_image_R@1"]) / 2
        for classes in sorted((data_dir / "zeroshot").glob("*.json")):
            images = CsvImages(classes.with_suffix(".csv"))
            classnames, templates = load_classnames(classes)
            features, labels = embed_images(model, preprocess, images, batch_size=batch_size, device=device,
                                            progress=False)
            classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=device)
            out[f"zeroshot_{classes.stem}_top1"] = zero_shot_accuracy(features, classifier, labels, ks=(1,))["top1"]
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
