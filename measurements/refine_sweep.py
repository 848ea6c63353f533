"""Does CLIP-Refine shrink the modality gap and keep zero-shot accuracy? A small learning-rate sweep.

Starts from the pretrained-track CLIPs that `make benchmark` trained (one per seed), refines each for one
epoch with the authors' recipe at lr 1e-6 and at larger learning rates, and reports the gap in both
conventions (||delta|| and ||delta||^2 / d, normalised and raw) with retrieval and zero-shot accuracy before
and after. Writes measurements/refine_sweep.{json,md}. Run after `make benchmark`:

    python measurements/refine_sweep.py [--seeds 0] [--lrs 1e-6 1e-5 1e-4]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from openclip_align.experiments.scoring import evaluate_model
from openclip_align.experiments.regimes import PRETRAINED_LOCKS, PRETRAINED_MODEL
from openclip_align.experiments.benchmark import REFINE_EXTRA, REFINE_RECIPE
from openclip_align.experiments.trainer_processes import Budget, TrainSpec, train

KEYS = ("centroid_gap", "centroid_gap_sq_per_dim", "centroid_gap_sq_per_dim_raw", "alignment_score",
        "mean_norm_image", "mean_norm_text", "image_to_text_R@1", "text_to_image_R@1",
        "zeroshot_fashion_mnist_top1", "zeroshot_digits_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/default"))
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmark/runs/pretrained"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4])
    args = parser.parse_args()

    logs = Path("runs/benchmark/runs/refine-sweep")
    rows = {}
    for seed in args.seeds:
        start = args.runs / f"CLIP-seed{seed}" / "checkpoints" / "epoch_2.pt"
        if not start.exists():
            raise SystemExit(f"{start} not found: run `make benchmark` first")
        rows.setdefault("before", []).append(evaluate_model(PRETRAINED_MODEL, start, args.data))
        for lr in args.lrs:
            spec = TrainSpec(f"refine-lr{lr:g}", PRETRAINED_MODEL, loss="refine",
                             extra=["--pretrained", str(start), *REFINE_EXTRA, *PRETRAINED_LOCKS],
                             budget_override={**REFINE_RECIPE, "lr": lr})
            result = train(spec, str(args.data / "train.csv"), Budget(), seed, logs)
            rows.setdefault(f"lr {lr:g}", []).append(evaluate_model(PRETRAINED_MODEL, result.checkpoint, args.data))

    summary = {label: {key: statistics.fmean(run[key] for run in runs) for key in KEYS} for label, runs in rows.items()}
    (args.out / "refine_sweep.json").write_text(json.dumps({"seeds": args.seeds, "recipe": REFINE_RECIPE,
                                                            "locks": PRETRAINED_LOCKS, "rows": summary}, indent=2))
    header = ["| refine | ‖Δ‖ | ‖Δ‖²/d ×10³ | raw ‖Δ‖²/d | align. score | raw norm img / txt | I→T R@1 % | "
              "T→I R@1 % | zero-shot fashion % | zero-shot digits % |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"# CLIP-Refine learning-rate sweep ({PRETRAINED_MODEL}, seeds {args.seeds}, mean over seeds)", "",
             f"One epoch, batch {REFINE_RECIPE['batch_size']}, AdamW wd {REFINE_RECIPE['wd']}, constant lr, fp32, "
             "same tower locks as the CLIP it starts from. Made by `python measurements/refine_sweep.py`.", "", *header]
    for label, m in summary.items():
        lines.append(f"| {label} | {m['centroid_gap']:.3f} | {m['centroid_gap_sq_per_dim'] * 1e3:.3f} | "
                     f"{m['centroid_gap_sq_per_dim_raw']:.4f} | {m['alignment_score']:.3f} | "
                     f"{m['mean_norm_image']:.2f} / {m['mean_norm_text']:.2f} | {100 * m['image_to_text_R@1']:.1f} | "
                     f"{100 * m['text_to_image_R@1']:.1f} | {100 * m['zeroshot_fashion_mnist_top1']:.1f} | "
                     f"{100 * m['zeroshot_digits_top1']:.1f} |")
    (args.out / "refine_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
