"""The course study, rerun on your data: a grid of losses x optimizers through the upstream trainer.

Every cell is one ``python -m open_clip_train.main --loss L --opt O`` run with the same model, data,
steps, batch, schedule and seed; only the learning rate follows the optimizer (SGD needs a much larger
one than the Adam family). Each trained model is scored on the held-out pairs (R@1 both ways, centroid
gap) and the zero-shot sets (top-1, averaged over sets); the "average" column is the mean of the two
R@1 and the zero-shot top-1, as in the study's summary number. A run whose loss became non-finite, or
whose final weights are, is reported as diverged rather than as an error.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .benchmark_report import write_json_atomic
from .machine import at_end, at_start
from .regimes import REGIMES
from .scoring import evaluate_model
from .trainer_processes import Budget, TrainSpec, train

STUDY_LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")
STUDY_OPTIMIZERS = ("adamw", "sgd", "adam")
# Learning rates per optimizer on the embedded default (the same in both regimes); --lr OPT=VALUE overrides.
DEFAULT_LR = dict(REGIMES["pretrained"].lr)
SCORE_KEYS = ("image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1", "average", "centroid_gap")
# the trainer's messages when a loss turns NaN/inf, and when it refuses to save NaN/inf weights
_DIVERGED_MARKS = ("became non-finite", "the training diverged")


@dataclass
class StudyPlan:
    losses: List[str] = field(default_factory=lambda: list(STUDY_LOSSES))
    optimizers: List[str] = field(default_factory=lambda: list(STUDY_OPTIMIZERS))
    model: str = REGIMES["pretrained"].model
    seeds: List[int] = field(default_factory=lambda: [0])
    lr: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    budget: Budget = field(default_factory=lambda: Budget(epochs=REGIMES["pretrained"].study_epochs, warmup=20))
    extra: List[str] = field(default_factory=lambda: list(REGIMES["pretrained"].extra))   # every trainer run
    regime: str = "pretrained"


def weights_are_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("state_dict", state)
    return all(torch.isfinite(t).all() for t in weights.values() if torch.is_tensor(t) and t.is_floating_point())


def score(metrics: Dict[str, float]) -> Dict[str, float]:
    """The study's columns from one evaluation (zero-shot top-1 averaged over the sets present)."""
    zero_shot = [v for k, v in metrics.items() if k.startswith("zeroshot_") and k.endswith("_top1")]
    out = {"image_to_text_R@1": metrics["image_to_text_R@1"], "text_to_image_R@1": metrics["text_to_image_R@1"],
           "zeroshot_top1": statistics.fmean(zero_shot) if zero_shot else float("nan"),
           "centroid_gap": metrics["centroid_gap"]}
    parts = [out["image_to_text_R@1"], out["text_to_image_R@1"]] + ([out["zeroshot_top1"]] if zero_shot else [])
    out["average"] = statistics.fmean(parts)
    return out


def run_cell(plan: StudyPlan, loss: str, optimizer: str, seed: int, data_dir: Path, runs_dir: Path) -> dict:
    """Train and score one (loss, optimizer, seed); never raises for a diverged run."""
    if optimizer not in plan.lr:
        raise ValueError(f"no learning rate for --opt {optimizer}: pass --lr {optimizer}=VALUE")
    spec = TrainSpec(f"{loss}-{optimizer}", plan.model, loss=loss, extra=["--opt", optimizer, *plan.extra],
                     budget_override={"lr": plan.lr[optimizer]})
    cell = {"loss": loss, "optimizer": optimizer, "seed": seed, "lr": plan.lr[optimizer]}
    outcome = train_and_score(spec, plan.model, plan.budget, seed, data_dir, runs_dir, score)
    outcome.pop("checkpoint", None)
    return {**cell, **outcome}


def train_and_score(spec: TrainSpec, model: str, budget: Budget, seed: int, data_dir: Path, runs_dir: Path,
                    score_of: Callable[[Dict[str, float]], Dict[str, float]], train_csv: Optional[Path] = None,
                    name: Optional[str] = None) -> dict:
    """One trainer run scored on the corpus: {"status": "ok", **score_of(metrics)}, or "diverged" (a non-finite
    loss, weights or score) or "failed" with the trainer's last line; never raises for either. It trains on
    ``train_csv`` (default: the corpus's train.csv; the scaling study passes a subset) and is always scored on
    ``data_dir``'s held-out pairs and zero-shot sets; ``name`` is the run's folder under ``runs_dir``."""
    try:
        result = train(spec, str(train_csv or data_dir / "train.csv"), budget, seed, runs_dir, progress=True,
                       name=name)
    except RuntimeError as err:
        if any(mark in str(err) for mark in _DIVERGED_MARKS):
            return {"status": "diverged"}
        lines = [line for line in str(err).splitlines() if line.strip()]
        return {"status": "failed", "reason": (lines[-1] if lines else str(err))[:300]}
    out = {"samples_per_second": result.samples_per_second, "wall_seconds": result.wall_seconds,
           "checkpoint": str(result.checkpoint)}
    if not weights_are_finite(result.checkpoint):
        return {**out, "status": "diverged"}
    values = score_of(evaluate_model(model, result.checkpoint, data_dir, device=budget.device))
    if not all(v == v for v in values.values()):      # NaN anywhere: the embeddings collapsed to NaN
        return {**out, "status": "diverged"}
    return {**out, "status": "ok", **values}


def summarise(cells: List[dict]) -> Dict[str, Dict[str, dict]]:
    """table[loss][optimizer] = {status, KEY: {mean, std}} over the seeds that finished."""
    table: Dict[str, Dict[str, dict]] = {}
    for cell in cells:
        table.setdefault(cell["loss"], {}).setdefault(cell["optimizer"], []).append(cell)
    out: Dict[str, Dict[str, dict]] = {}
    for loss, by_opt in table.items():
        out[loss] = {}
        for opt, runs in by_opt.items():
            done = [r for r in runs if r["status"] == "ok"]
            entry = {"runs": len(runs), "finished": len(done),
                     "status": "ok" if done else ("diverged" if any(r["status"] == "diverged" for r in runs)
                                                  else "failed")}
            for key in SCORE_KEYS if done else ():
                values = [r[key] for r in done]
                entry[key] = {"mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            out[loss][opt] = entry
    return out


def title(results: dict) -> str:
    plan = results["plan"]
    return (f"{plan.get('regime', 'scratch')} regime: {plan['model']}"
            f"{' ' + ' '.join(plan['extra']) if plan.get('extra') else ''}, {plan['budget']['epochs']} epochs, "
            f"batch {plan['budget']['batch_size']}, seeds {plan['seeds']}")


def table_lines(results: dict) -> List[str]:
    """The grid as a markdown table (also what README shows)."""
    lines = ["| loss | optimizer | I→T R@1 | T→I R@1 | zero-shot top-1 | average | centroid gap |",
             "|---|---|---|---|---|---|---|"]
    for loss, by_opt in results["table"].items():
        for opt, entry in by_opt.items():
            if entry["status"] != "ok":
                lines.append(f"| {loss} | {opt} | {entry['status']} | | | | |")
                continue
            cells = [_fmt(entry[key], 100, 1) for key in SCORE_KEYS[:4]] + [_fmt(entry["centroid_gap"], 1, 3)]
            if entry["finished"] < entry["runs"]:
                cells[-1] += f" ({entry['runs'] - entry['finished']} of {entry['runs']} seeds diverged)"
            lines.append(f"| {loss} | {opt} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    plan = results["plan"]
    lines = [f"# Loss x optimizer study ({title(results)})", "",
             f"Command: `{results['command']}`  ", f"Learning rates: {plan['lr']}; "
             "R@1 on the held-out pairs, zero-shot top-1 averaged over the zero-shot sets, in %; "
             "average = mean of the three (the study's summary number).", "", *table_lines(results)]
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (not divergence):"] + [
            f"- {c['loss']} / {c['optimizer']} seed {c['seed']}: {c['reason']}" for c in failed]
    lines += ["", f"Total time: {results['seconds'] / 60:.1f} min. Figure: `study.png`.", ""]
    return "\n".join(lines)


def _fmt(stat: dict, scale: float, digits: int) -> str:
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat["std"] else "")


def plot(results: dict, path: Path) -> Path:
    """Two heat maps, losses x optimizers: the average score and the centroid gap; diverged cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table, losses, optimizers = results["table"], results["plan"]["losses"], results["plan"]["optimizers"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(optimizers), 1.2 + 0.55 * len(losses)), squeeze=False)
    for ax, (key, title, scale, cmap) in zip(axes[0], [("average", "average score (%)", 100, "viridis"),
                                                       ("centroid_gap", "centroid gap", 1, "magma_r")]):
        grid = np.full((len(losses), len(optimizers)), np.nan)
        for i, loss in enumerate(losses):
            for j, opt in enumerate(optimizers):
                entry = table.get(loss, {}).get(opt)
                if entry and entry["status"] == "ok":
                    grid[i, j] = entry[key]["mean"] * scale
        colours = plt.get_cmap(cmap).with_extremes(bad="#dddddd")     # grey: diverged or failed cells
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, aspect="auto")
        for i, loss in enumerate(losses):
            for j, opt in enumerate(optimizers):
                entry = table.get(loss, {}).get(opt)
                text = f"{grid[i, j]:.{1 if scale == 100 else 3}f}" if np.isfinite(grid[i, j]) else \
                    (entry["status"] if entry else "–")
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=_ink(image, grid[i, j]))
        ax.set_xticks(range(len(optimizers)), optimizers)
        ax.set_yticks(range(len(losses)), losses)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_corpus(data_dir: Path) -> None:
    """Every cell trains on train.csv and is scored on heldout.csv: fail before the first run, not after it."""
    missing = [name for name in ("train.csv", "heldout.csv") if not (data_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir} has no {' or '.join(missing)}: build the embedded default first "
                                "(`make data`) or pass --data with a corpus laid out like it")


def run_study(data_dir: Path, out_dir: Path, plan: Optional[StudyPlan] = None, command: str = "") -> dict:
    plan = plan or StudyPlan()
    check_corpus(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    started, machine = time.time(), at_start()
    cells = []
    for loss in plan.losses:
        for optimizer in plan.optimizers:
            for seed in plan.seeds:
                logging.info("study: --loss %s --opt %s (seed %d)", loss, optimizer, seed)
                cells.append(run_cell(plan, loss, optimizer, seed, data_dir, runs_dir))
                logging.info("study: %s", cells[-1]["status"])
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command or f"openclip-align study --data {data_dir}",
        "plan": {"regime": plan.regime, "model": plan.model, "losses": plan.losses, "optimizers": plan.optimizers, "seeds": plan.seeds,
                 "lr": plan.lr, "budget": plan.budget.__dict__, "extra": plan.extra, "data": str(data_dir)},
        "cells": cells,
        "table": summarise(cells),
        "seconds": time.time() - started,
        "machine": at_end(machine),
    }
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "study.png")
    return results


def _ink(image, value: float) -> str:
    """Black on light cells (and on grey, missing ones), white on dark ones."""
    if value != value:              # NaN: a diverged or failed cell
        return "black"
    r, g, b, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
