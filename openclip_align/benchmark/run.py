"""The benchmark: train every configuration with one budget, evaluate, write the report.

Rows (all trained by ``python -m open_clip_train.main`` with identical data, steps, batch, schedule
and seed): upstream CLIP (OpenCLIP alone, a dual-tower config of about the same size), SharedCLIP
(``--loss clip``), AlignCLIP (``--loss imsep``, precomputed caption embeddings) and CLIP-Refine
(``--loss refine``, one epoch on the trained upstream CLIP of the same seed). A speed-only row
trains AlignCLIP with caption embeddings computed on the fly.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import open_clip

from . import report
from .evaluate import evaluate_model, metric_time_100k
from .training import Budget, TrainResult, TrainSpec, train, write_local_dir_config


@dataclass
class Plan:
    size: str                        # model size suffix: Tiny (CPU) or ViT-B-16 (GPU)
    seeds: List[int]
    budget: Budget
    refine_budget: Dict[str, object] = field(default_factory=dict)
    speed_epochs: int = 1

    @classmethod
    def default(cls, quick: bool = False, gpu: bool = False) -> "Plan":
        if gpu:
            budget = Budget(epochs=1 if quick else 5, batch_size=256, lr=5e-4, warmup=50, workers=4, device="cuda",
                            precision="amp_bf16", log_every=10)
            return cls("ViT-B-16", [0, 1, 2], budget, {"epochs": 1, "lr": 1e-5, "warmup": 0})
        if quick:
            return cls("Tiny", [0, 1, 2], Budget(epochs=1, batch_size=64, warmup=10),
                       {"epochs": 1, "lr": 1e-5, "warmup": 0})
        return cls("Tiny", [0, 1, 2], Budget(epochs=3), {"epochs": 1, "lr": 1e-5, "warmup": 0})


def upstream_model_name(size: str) -> str:
    """The dual-tower baseline: our DualCLIP-Tiny config on CPU, OpenCLIP's own ViT-B-16 on GPU."""
    return "ViT-B-16" if size == "ViT-B-16" else f"DualCLIP-{size}"


def run_benchmark(data_dir: Path, out_dir: Path, quick: bool = False, gpu: bool = False,
                  seeds: Optional[List[int]] = None) -> dict:
    plan = Plan.default(quick=quick, gpu=gpu)
    if seeds:
        plan.seeds = seeds
    train_csv = data_dir / "train.csv"
    if not train_csv.exists():
        raise FileNotFoundError(f"{train_csv} not found: build the embedded default first (`make data`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    device = plan.budget.device

    baseline = upstream_model_name(plan.size)
    baseline_cfg = open_clip.get_model_config(baseline)
    image_size = baseline_cfg["vision_cfg"]["image_size"]
    upstream_dir = write_local_dir_config(baseline_cfg, runs_dir / "upstream-model", image_size)
    specs = {
        "upstream CLIP": TrainSpec("upstream CLIP", upstream_dir, upstream=True),
        "SharedCLIP": TrainSpec("SharedCLIP", f"SharedCLIP-{plan.size}", loss="clip"),
        "AlignCLIP": TrainSpec("AlignCLIP", f"AlignCLIP-{plan.size}", loss="imsep",
                               extra=["--semantic-source", "precomputed"]),
    }
    eval_names = {"upstream CLIP": baseline, "SharedCLIP": f"SharedCLIP-{plan.size}",
                  "AlignCLIP": f"AlignCLIP-{plan.size}", "CLIP-Refine": baseline}

    trained: Dict[str, List[TrainResult]] = {}
    started = time.time()
    for seed in plan.seeds:
        for label, spec in specs.items():
            logging.info("benchmark: training %s (seed %d)", label, seed)
            trained.setdefault(label, []).append(train(spec, str(train_csv), plan.budget, seed, runs_dir))
        refine = TrainSpec("CLIP-Refine", baseline, loss="refine",
                           extra=["--pretrained", str(trained["upstream CLIP"][-1].checkpoint),
                                  "--lr-scheduler", "const"],
                           budget_override=plan.refine_budget)
        logging.info("benchmark: refining upstream CLIP (seed %d)", seed)
        trained.setdefault("CLIP-Refine", []).append(train(refine, str(train_csv), plan.budget, seed, runs_dir))
    speed_spec = TrainSpec("AlignCLIP on-the-fly", f"AlignCLIP-{plan.size}", loss="imsep",
                           extra=["--semantic-source", "on-the-fly"], budget_override={"epochs": plan.speed_epochs})
    skipped = {}
    try:
        trained["AlignCLIP on-the-fly"] = [train(speed_spec, str(train_csv), plan.budget, plan.seeds[0], runs_dir)]
    except RuntimeError as err:   # e.g. no sentence-transformers model on this machine: report, keep the rest
        logging.error("benchmark: speed row 'AlignCLIP on-the-fly' failed: %s", err)
        lines = [line for line in str(err).splitlines() if line.strip()]
        skipped["AlignCLIP on-the-fly"] = lines[-1][:200]      # the error the trainer ended with
    train_seconds = time.time() - started

    quality: Dict[str, List[Dict[str, float]]] = {}
    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    for label, results in trained.items():
        if label not in eval_names:
            continue
        for i, result in enumerate(results):
            plot = figures / f"pca_{label.replace(' ', '_')}.png" if i == 0 else None
            quality.setdefault(label, []).append(
                evaluate_model(eval_names[label], result.checkpoint, data_dir, device=device, plot_path=plot))

    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"openclip-align benchmark --data {data_dir}" + (" --quick" if quick else "") + (" --gpu" if gpu else ""),
        "machine": {"platform": platform.platform(), "device": device, "python": platform.python_version(),
                    "open_clip": open_clip.__version__},
        "plan": {"size": plan.size, "seeds": plan.seeds, "budget": plan.budget.__dict__,
                 "refine_budget": plan.refine_budget, "data": str(data_dir), "train_pairs": _count_rows(train_csv)},
        "quality": report.summarise_quality(quality),
        "speed": report.summarise_speed(trained, baseline_label="upstream CLIP"),
        "metric_seconds_100k_pairs_768d": metric_time_100k(),
        "train_seconds": train_seconds,
        "skipped": skipped,
    }
    # The regression baseline is the last run of the same variant (a 1-epoch run says nothing about a 3-epoch one).
    variant = ("gpu" if gpu else "cpu") + ("-quick" if quick else "")
    results["variant"] = variant
    baseline_path = out_dir / "baselines" / f"{variant}.json"
    previous = json.loads(baseline_path.read_text()) if baseline_path.exists() else None
    results["compared_with"] = previous["created"] if previous else None
    results["flags"] = report.regressions(results, previous)
    baseline_path.parent.mkdir(exist_ok=True)
    report.write_json_atomic(out_dir / "results.json", results)
    report.write_json_atomic(baseline_path, results)
    (out_dir / "results.md").write_text(report.markdown(results))
    report.plot_quality(results, figures / "quality.png")
    return results


def _count_rows(csv: Path) -> int:
    with open(csv, encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1
