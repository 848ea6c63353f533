"""``openclip-align gap``: embed image-caption pairs with any OpenCLIP model and measure its modality gap.

Writes ``gap.json`` (metrics, retrieval, optional zero-shot, lambda sweep) and three PNGs (PCA with
the gap vector, paired/unpaired cosine histograms, lambda sweep) to ``--out``, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEFAULT_LAMBDAS = (-0.25, 0.0, 0.25, 0.5, 0.75, 1.0)


class CommandError(Exception):
    """A user-facing problem (bad path, column, model name): printed without a traceback."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gap", help="measure the modality gap of an OpenCLIP model on image-caption pairs",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="OpenCLIP model name (upstream or plugin, e.g. ViT-B-32)")
    p.add_argument("--pretrained", default=None, help="checkpoint path or OpenCLIP pretrained tag; none: random init")
    p.add_argument("--data", required=True,
                   help="image-caption pairs: OpenCLIP CSV, or webdataset shards 'dir/train-{000000..000003}.tar'")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions")
    p.add_argument("--csv-separator", default="\t", help="CSV separator; a tab unless given ('\\t' accepted) (default: %(default)r)")
    p.add_argument("--classes", default=None, help="classification CSV (image column and integer --csv-label-key)")
    p.add_argument("--classnames", default=None,
                   help='class-set JSON {"classnames": [...], "templates": ["a photo of a {}.", ...]}')
    p.add_argument("--csv-label-key", default="label", help="label column of the --classes CSV")
    p.add_argument("--out", default="gap-report", help="output directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="none: cuda when available, else cpu")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="model weights precision")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs (and N class images)")
    p.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS),
                   help="embedding-shift strengths for the sweep")
    p.add_argument("--max-pairs", type=int, default=5000, help="subsample size for uniformity and separability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


# --- steps ------------------------------------------------------------------------------------------
def _pick_device(requested):
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but no CUDA device is available")
    return requested


def _check_args(args) -> None:
    if (args.classes is None) != (args.classnames is None):
        raise CommandError("--classes and --classnames go together (images with labels, and the class names)")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--max-pairs", args.max_pairs)):
        if value is not None and value < (2 if flag != "--batch-size" else 1):
            raise CommandError(f"{flag} must be at least {2 if flag != '--batch-size' else 1}, got {value}")
    if args.csv_separator in ("\\t", "tab"):
        args.csv_separator = "\t"


def _create_model(args, device):
    import open_clip

    from ..model_loading import ModelLoadError, create_model_for_command

    try:
        model, _, preprocess = create_model_for_command(args.model, args.pretrained, device=device,
                                                        precision=args.precision)
    except ModelLoadError as err:
        raise CommandError(str(err)) from None
    return model, preprocess, open_clip.get_tokenizer(args.model)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _print_table(result, out=None) -> None:
    out = out or sys.stdout  # looked up at call time: sys.stdout may have been replaced since import

    def line(name, value):
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<24} {text:>10}", file=out)

    print(f"modality gap of {result['model']} ({result['pretrained'] or 'random init'}) on {result['data']}: "
          f"{result['n_pairs']} pairs, {result['device']}", file=out)
    for key, value in result["gap"].items():
        line(key, value)
    print("retrieval (paired, index matching)", file=out)
    for key, value in result["retrieval"].items():
        line(key, value)
    if result["zero_shot"]:
        print(f"zero-shot ({result['zero_shot']['n_images']} images, {result['zero_shot']['n_classes']} classes)",
              file=out)
        line("top1", result["zero_shot"]["top1"])
        line("top5", result["zero_shot"]["top5"])
    sweep = result["lambda_sweep"]
    cols = [k for k in sweep[0] if k != "lambda"]
    print("embedding shift sweep (x - lambda*delta, y + lambda*delta)", file=out)
    print("  " + f"{'lambda':>7} " + " ".join(f"{c:>18}" for c in cols), file=out)
    for row in sweep:
        print("  " + f"{row['lambda']:>7.3f} " + " ".join(f"{row[c]:>18.4f}" for c in cols), file=out)


def compute(args) -> dict:
    """Everything the command does except printing; returns the JSON-ready result."""
    from ..evaluation import (CsvImages, embed_images, embed_pairs, load_classnames, open_pairs, retrieval_recall,
                              zero_shot_accuracy, zero_shot_classifier)
    from ..metrics import feature_norm_stats, lambda_sweep, modality_gap_report
    from ..metrics.plots import plot_cosine_histograms, plot_gap_pca, plot_lambda_sweep

    _check_args(args)
    # Validate every input before the (slow) model creation.
    try:
        pairs = open_pairs(args.data, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                           sep=args.csv_separator, limit=args.limit)
        class_images = classnames = templates = None
        if args.classes:
            classnames, templates = load_classnames(args.classnames)
            class_images = CsvImages(args.classes, img_key=args.csv_img_key, label_key=args.csv_label_key,
                                     sep=args.csv_separator, limit=args.limit)
            bad = [lab for lab in class_images.labels if not 0 <= lab < len(classnames)]
            if bad:
                raise ValueError(f"{args.classes}: label {bad[0]} is outside [0, {len(classnames) - 1}] "
                                 f"for the {len(classnames)} classes of {args.classnames}")
    except (OSError, ValueError) as err:
        raise CommandError(str(err)) from None

    device = _pick_device(args.device)
    model, preprocess, tokenizer = _create_model(args, device)
    progress = not args.no_progress
    t0 = time.perf_counter()
    try:
        raw_image, raw_text = embed_pairs(model, preprocess, tokenizer, pairs, batch_size=args.batch_size,
                                          device=device, limit=args.limit, progress=progress, normalize=False)
    except (OSError, ValueError) as err:  # unreadable image or malformed shard sample
        raise CommandError(f"reading {args.data}: {err}") from None
    if len(raw_image) < 2:
        raise CommandError(f"{args.data}: need at least 2 pairs, got {len(raw_image)}")
    import torch.nn.functional as F

    image_features, text_features = F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1)
    zero_shot = classifier = class_feats = labels = None
    if class_images is not None:
        classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=device, progress=progress)
        class_feats, labels = embed_images(model, preprocess, class_images, batch_size=args.batch_size,
                                           device=device, limit=args.limit, progress=progress)
        zero_shot = dict(zero_shot_accuracy(class_feats, classifier, labels, ks=(1, 5)),
                         n_images=len(labels), n_classes=len(classnames))
    t_embed = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = modality_gap_report(image_features, text_features, seed=args.seed, max_pairs=args.max_pairs)
    report.update(feature_norm_stats(raw_image, raw_text))      # raw norms, the gap on raw features
    retrieval = retrieval_recall(image_features, text_features, ks=(1, 5))
    sweep = lambda_sweep(image_features, text_features, args.lambdas,
                         class_text_features=None if classifier is None else classifier.T,
                         labels=labels, class_image_features=class_feats)
    t_metrics = time.perf_counter() - t0

    os.makedirs(args.out, exist_ok=True)
    plots = {
        "pca": plot_gap_pca(image_features, text_features, os.path.join(args.out, "gap_pca.png"), seed=args.seed),
        "cosine_histograms": plot_cosine_histograms(image_features, text_features,
                                                    os.path.join(args.out, "gap_cosines.png"), seed=args.seed),
        "lambda_sweep": plot_lambda_sweep(sweep, os.path.join(args.out, "gap_lambda_sweep.png")),
    }
    return {
        "model": args.model, "pretrained": args.pretrained, "data": os.fspath(args.data),
        "classes": args.classes, "classnames": args.classnames, "device": device, "precision": args.precision,
        "n_pairs": int(len(image_features)), "seed": args.seed, "max_pairs": args.max_pairs,
        "gap": report, "retrieval": retrieval, "zero_shot": zero_shot, "lambda_sweep": sweep,
        "plots": {k: os.path.basename(v) for k, v in plots.items()},
        "timing_s": {"embed": round(t_embed, 3), "metrics": round(t_metrics, 3)},
    }


def run(args) -> int:
    try:
        result = compute(args)
    except CommandError as err:
        print(f"openclip-align gap: error: {err}", file=sys.stderr)
        return 2
    path = os.path.join(args.out, "gap.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_finite_or_none(result), fh, indent=2, allow_nan=False)
        fh.write("\n")
    _print_table(result)
    print(f"wrote {path} and {', '.join(result['plots'].values())} in {args.out}")
    return 0
