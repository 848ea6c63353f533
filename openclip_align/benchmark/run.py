"""The benchmark: train every configuration of each track with one budget, evaluate, write the report.

Two tracks, each a table of its own (every run is a real ``python -m open_clip_train.main`` process
with identical data, steps, batch, schedule and seed within the track):

* ``scratch``: small models trained from random weights. Upstream CLIP (OpenCLIP alone, a dual-tower
  config of about the same size), SharedCLIP (``--loss clip``), AlignCLIP (``--loss imsep``,
  precomputed caption embeddings) and CLIP-Refine on the trained upstream CLIP of the same seed.
* ``pretrained``: ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2 towers installed from packages
  (``DualCLIP-Lite0-MiniLM``), so downstream numbers sit above chance: the same model with
  ``--loss clip`` (upstream's loss), with ``--loss imsep``, and CLIP-Refine on the trained CLIP.

CLIP-Refine always runs the authors' recipe (:data:`REFINE_RECIPE`). A speed-only row trains AlignCLIP
with caption embeddings computed on the fly.
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
from .regimes import PRETRAINED_LOCKS, PRETRAINED_MODEL, REGIMES
from .training import Budget, TrainResult, TrainSpec, train, write_local_dir_config

# CLIP-Refine as the authors' released code runs it: AdamW lr 1e-6 constant, weight decay 0.1, one epoch,
# fp32, batch 512 (it fits every CPU model here). Upstream exempts gains and biases from weight decay where
# the authors decay every parameter: at lr 1e-6 that is a relative change below 1e-4 over an epoch (see
# docs/training.md), so no flag for it.
REFINE_RECIPE = {"epochs": 1, "lr": 1e-6, "warmup": 0, "wd": 0.1, "batch_size": 512, "precision": "fp32"}
# torch's AdamW defaults, which the authors keep (open_clip_train would pick 0.98 / 1e-6 for ViTs)
REFINE_EXTRA = ["--lr-scheduler", "const", "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8"]



@dataclass
class Track:
    name: str                          # "scratch" / "pretrained"
    title: str
    specs: Dict[str, TrainSpec]        # trained for every seed, in order
    eval_models: Dict[str, str]        # row label -> OpenCLIP model name its checkpoint loads into
    budget: Budget
    refine_from: str                   # row whose checkpoint CLIP-Refine starts from (also the speed baseline)
    refine_model: str
    speed_only: List[TrainSpec] = field(default_factory=list)

    def refine_spec(self, start_checkpoint: Path) -> TrainSpec:
        return TrainSpec("CLIP-Refine", self.refine_model, loss="refine",
                         extra=["--pretrained", str(start_checkpoint), *REFINE_EXTRA, *self.specs[self.refine_from].extra],
                         budget_override=REFINE_RECIPE)


def scratch_track(runs_dir: Path, quick: bool, gpu: bool) -> Track:
    if gpu:
        size = "ViT-B-16"
        budget = Budget(epochs=1 if quick else 5, batch_size=256, lr=5e-4, warmup=50, workers=4, device="cuda",
                        precision="amp_bf16", log_every=10)
    else:
        size = "Tiny"
        budget = Budget(epochs=1, batch_size=64, warmup=10) if quick else Budget(epochs=3)
    baseline = "ViT-B-16" if gpu else f"DualCLIP-{size}"   # OpenCLIP's own ViT-B-16 on GPU
    baseline_cfg = open_clip.get_model_config(baseline)
    upstream_dir = write_local_dir_config(baseline_cfg, runs_dir / "upstream-model",
                                          baseline_cfg["vision_cfg"]["image_size"])
    specs = {
        "upstream CLIP": TrainSpec("upstream CLIP", upstream_dir, upstream=True),
        "SharedCLIP": TrainSpec("SharedCLIP", f"SharedCLIP-{size}", loss="clip"),
        "AlignCLIP": TrainSpec("AlignCLIP", f"AlignCLIP-{size}", loss="imsep",
                               extra=["--semantic-source", "precomputed"]),
    }
    # the cost of embedding captions per step, with the fast encoder (mpnet on the fly would take most of the budget)
    speed = [TrainSpec("AlignCLIP on-the-fly (MiniLM)", f"AlignCLIP-{size}", loss="imsep",
                       extra=["--semantic-source", "on-the-fly", "--semantic-model", "all-MiniLM-L6-v2"],
                       budget_override={"epochs": 1})]
    return Track("scratch", f"Trained from scratch ({size} models)", specs,
                 {"upstream CLIP": baseline, "SharedCLIP": f"SharedCLIP-{size}", "AlignCLIP": f"AlignCLIP-{size}",
                  "CLIP-Refine": baseline},
                 budget, refine_from="upstream CLIP", refine_model=baseline, speed_only=speed)


def pretrained_track(quick: bool) -> Track:
    budget = Budget(epochs=1 if quick else REGIMES["pretrained"].epochs, batch_size=64, lr=1e-3, warmup=20)
    specs = {
        "CLIP": TrainSpec("CLIP", PRETRAINED_MODEL, loss="clip", extra=list(PRETRAINED_LOCKS)),
        "AlignCLIP loss": TrainSpec("AlignCLIP loss", PRETRAINED_MODEL, loss="imsep",
                                    extra=[*PRETRAINED_LOCKS, "--semantic-source", "precomputed"]),
    }
    return Track("pretrained", f"Pretrained towers from packages ({PRETRAINED_MODEL})", specs,
                 {"CLIP": PRETRAINED_MODEL, "AlignCLIP loss": PRETRAINED_MODEL, "CLIP-Refine": PRETRAINED_MODEL},
                 budget, refine_from="CLIP", refine_model=PRETRAINED_MODEL)


TRACKS = ("scratch", "pretrained")


def run_track(track: Track, train_csv: Path, data_dir: Path, out_dir: Path, runs_dir: Path,
              seeds: List[int]) -> dict:
    trained: Dict[str, List[TrainResult]] = {}
    skipped: Dict[str, str] = {}
    started = time.time()
    logs = runs_dir / track.name
    for seed in seeds:
        for label, spec in track.specs.items():
            logging.info("benchmark %s: training %s (seed %d)", track.name, label, seed)
            trained.setdefault(label, []).append(train(spec, str(train_csv), track.budget, seed, logs))
        logging.info("benchmark %s: CLIP-Refine of %s (seed %d)", track.name, track.refine_from, seed)
        refine = track.refine_spec(trained[track.refine_from][-1].checkpoint)
        trained.setdefault("CLIP-Refine", []).append(train(refine, str(train_csv), track.budget, seed, logs))
    for spec in track.speed_only:
        try:
            trained[spec.label] = [train(spec, str(train_csv), track.budget, seeds[0], logs)]
        except RuntimeError as err:   # e.g. no sentence-transformers model on this machine: report, keep the rest
            logging.error("benchmark: speed row %r failed: %s", spec.label, err)
            lines = [line for line in str(err).splitlines() if line.strip()]
            skipped[spec.label] = lines[-1][:200]      # the error the trainer ended with
    train_seconds = time.time() - started

    quality: Dict[str, List[Dict[str, float]]] = {}
    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    for label, results in trained.items():
        if label not in track.eval_models:
            continue
        for i, result in enumerate(results):
            plot = figures / f"pca_{track.name}_{label.replace(' ', '_')}.png" if i == 0 else None
            quality.setdefault(label, []).append(evaluate_model(
                track.eval_models[label], result.checkpoint, data_dir, device=track.budget.device, plot_path=plot))
    return {
        "title": track.title,
        "plan": {"seeds": seeds, "budget": track.budget.__dict__, "refine_recipe": REFINE_RECIPE,
                 "rows": {label: {"model": spec.model, "loss": spec.loss, "extra": spec.extra}
                          for label, spec in track.specs.items()}},
        "quality": report.summarise_quality(quality),
        "speed": report.summarise_speed(trained, baseline_label=track.refine_from),
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - started - train_seconds,
        "skipped": skipped,
    }


def run_benchmark(data_dir: Path, out_dir: Path, quick: bool = False, gpu: bool = False,
                  seeds: Optional[List[int]] = None, tracks=TRACKS) -> dict:
    train_csv = data_dir / "train.csv"
    if not train_csv.exists():
        raise FileNotFoundError(f"{train_csv} not found: build the embedded default first (`make data`)")
    unknown = set(tracks) - set(TRACKS)
    if unknown:
        raise ValueError(f"unknown benchmark track(s) {sorted(unknown)}; known: {', '.join(TRACKS)}")
    if gpu and "pretrained" in tracks:
        tracks = [t for t in tracks if t != "pretrained"]   # the GPU variant measures ViT-B-16 throughput
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    seeds = list(seeds or [0, 1, 2])
    started = time.time()
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"openclip-align benchmark --data {data_dir}" + (" --quick" if quick else "")
                   + (" --gpu" if gpu else "") + ("" if list(tracks) == list(TRACKS) else f" --tracks {' '.join(tracks)}"),
        "machine": {"platform": platform.platform(), "device": "cuda" if gpu else "cpu",
                    "python": platform.python_version(), "open_clip": open_clip.__version__},
        "data": {"path": str(data_dir), "train_pairs": _count_rows(train_csv), "encoder": _encoder(data_dir)},
        "tracks": {},
    }
    builders = {"scratch": lambda: scratch_track(runs_dir, quick, gpu), "pretrained": lambda: pretrained_track(quick)}
    for name in tracks:
        results["tracks"][name] = run_track(builders[name](), train_csv, data_dir, out_dir, runs_dir, seeds)
    results["total_seconds"] = time.time() - started
    results["metric_seconds_100k_pairs_768d"] = metric_time_100k()
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
    report.plot_quality(results, out_dir / "figures" / "quality.png")
    return results


def _encoder(data_dir: Path) -> Optional[str]:
    manifest = data_dir / "manifest.json"
    if not manifest.exists():
        return None
    encoder = json.loads(manifest.read_text()).get("encoder")
    return encoder.get("model") if isinstance(encoder, dict) else None


def _count_rows(csv: Path) -> int:
    with open(csv, encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1
