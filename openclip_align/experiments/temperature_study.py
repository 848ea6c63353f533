"""The temperature study: does a sharp contrastive temperature keep the modality gap open here too?

Mind the Gap (Liang et al., NeurIPS 2022) fine-tuned pretrained CLIP at six fixed temperatures and found the
gap ending wide at sharp ones and narrow at T = 1. This study repeats that on the pretrained-tower model:

* the start model is the benchmark's pretrained-track CLIP row (``DualCLIP-Lite0-MiniLM`` with its tower
  locks, ``--loss clip``, the track's budget, seed 0), trained here or given as a checkpoint (``start``);
* every temperature T fine-tunes it for one epoch with ``--loss clip --fixed-temperature T`` and one budget
  for all T (:data:`FINETUNE_RECIPE`);
* beside them, CLIP-Refine from the same start with the authors' recipe: its HyCD on raw features (the
  authors'), on cosine similarities times the start model's own learned scale, and times 1;
* every model, the start one included, is scored on the held-out pairs and the zero-shot sets.

Output: ``results.json``, ``results.md`` and ``temperature.png`` in the study's folder.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from openclip_align.integration.fixed_temperature import MAX_TEMPERATURE, MIN_TEMPERATURE   # --fixed-temperature's range

from .benchmark import REFINE_EXTRA, REFINE_RECIPE, pretrained_track
from .benchmark_report import write_json_atomic
from .grid_study import check_corpus, score, train_and_score
from .regimes import PRETRAINED_LOCKS, PRETRAINED_MODEL
from .scoring import evaluate_model
from .trainer_processes import Budget, TrainSpec, train

DEFAULT_TEMPERATURES = (0.01, 0.02, 0.0333, 0.05, 0.1, 1.0)   # Mind the Gap's 1/100, 1/50, 1/30, 1/20, 1/10, 1
# The fine-tuning budget of every temperature (over the start model's batch 64 and weight decay 0.1). Mind the Gap
# fine-tuned OpenAI CLIP with Adam at lr 1e-5 (1/50 of CLIP's pre-training peak) for 5 epochs of 50k pairs; one
# epoch of the default corpus is about 35x fewer steps, so the rate is 1/10 of the 1e-3 the start model trained
# at, with a short warm-up and upstream's cosine decay. Chosen before any run, never tuned on held-out numbers.
FINETUNE_RECIPE = {"epochs": 1, "lr": 1e-4, "warmup": 10}
# Mind the Gap's published centroid gaps after fine-tuning OpenAI CLIP on COCO at each temperature (from 0.83)
MIND_THE_GAP = {"model": "OpenAI CLIP", "data": "MSCOCO", "start_gap": 0.83,
                "gaps": {0.01: 1.00, 0.02: 0.80, 1 / 30: 0.64, 0.05: 0.55, 0.1: 0.30, 1.0: 0.24}}
COLUMNS = ("centroid_gap", "alignment_score", "image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1")


def check_temperatures(temperatures) -> List[float]:
    """The temperatures as floats; ValueError for one outside [0.01, 1], a repeat, or none at all."""
    values = [float(t) for t in temperatures]
    if not values:
        raise ValueError("--temperatures needs at least one temperature")
    bad = [t for t in values if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE]
    if bad:
        raise ValueError(f"--temperatures {' '.join(f'{t:g}' for t in bad)}: every T must lie in "
                         f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], because open_clip_train clamps the logit "
                         "scale log(1/T) to [0, log 100] after every step")
    if len(set(values)) != len(values):
        raise ValueError(f"--temperatures {' '.join(f'{t:g}' for t in values)}: a temperature is repeated")
    return values


def check_refine_lrs(lrs) -> List[float]:
    """CLIP-Refine's learning rates as floats; ValueError for none, one not above 0, or a repeat."""
    values = [float(lr) for lr in lrs]
    if not values or any(not lr > 0 for lr in values) or len(set(values)) != len(values):
        raise ValueError(f"--refine-lrs {' '.join(f'{lr:g}' for lr in values) or '(none)'}: give one or more "
                         "distinct learning rates above 0, e.g. 1e-6 1e-4")
    return values


def _start_budget() -> Budget:
    return pretrained_track(quick=False).budget


@dataclass
class TemperaturePlan:
    temperatures: List[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    start: Optional[Path] = None                  # a start checkpoint; None: train the start model first
    model: str = PRETRAINED_MODEL
    extra: List[str] = field(default_factory=lambda: list(PRETRAINED_LOCKS))   # every trainer run
    seed: int = 0
    start_budget: Budget = field(default_factory=_start_budget)
    finetune: Dict[str, object] = field(default_factory=lambda: dict(FINETUNE_RECIPE))
    refine: Dict[str, object] = field(default_factory=lambda: dict(REFINE_RECIPE))
    # CLIP-Refine's learning rates: the authors' recipe's, and (issue 31) 1e-4, where refine moves the model
    refine_lrs: List[float] = field(default_factory=lambda: [REFINE_RECIPE["lr"]])

    def __post_init__(self):
        self.temperatures = check_temperatures(self.temperatures)
        self.refine_lrs = check_refine_lrs(self.refine_lrs)

    def start_spec(self) -> TrainSpec:
        """The pretrained track's CLIP row."""
        return TrainSpec("start CLIP", self.model, loss="clip", extra=list(self.extra))

    def finetune_spec(self, temperature: float, start: Path) -> TrainSpec:
        return TrainSpec(f"CLIP T={temperature:g}", self.model, loss="clip",
                         extra=["--pretrained", str(start), "--fixed-temperature", repr(float(temperature)),
                                *self.extra], budget_override=dict(self.finetune))

    def refine_spec(self, start: Path, hycd_logit_scale: Optional[float], lr: Optional[float] = None) -> TrainSpec:
        """CLIP-Refine as the benchmark runs it (at ``lr``: the recipe's otherwise); with a scale, HyCD on that
        scale x cosine similarities."""
        lr = self.refine["lr"] if lr is None else lr
        extra = ["--pretrained", str(start), *REFINE_EXTRA, *self.extra]
        if hycd_logit_scale is not None:
            extra += ["--hycd-logit-scale", repr(float(hycd_logit_scale))]
        name = "raw" if hycd_logit_scale is None else f"S={hycd_logit_scale:.4g}"
        name += "" if lr == self.refine["lr"] else f" lr={lr:g}"
        return TrainSpec(f"CLIP-Refine {name}", self.model, loss="refine", extra=extra,
                         budget_override={**self.refine, "lr": lr})

    def rows(self, start: Path, own_scale: float) -> List[dict]:
        """Every trained row: its spec and what the table shows for it, in table order."""
        rows = [{"label": f"CLIP, T = {t:g}", "kind": "fixed temperature", "temperature": t,
                 "spec": self.finetune_spec(t, start)} for t in self.temperatures]
        for lr in self.refine_lrs:
            # one learning rate: the labels of the first published study; several: each label names its rate
            named = "CLIP-Refine" if self.refine_lrs == [self.refine["lr"]] else f"CLIP-Refine lr {lr:g}"
            for label, scale in [(f"{named}, raw-feature HyCD (authors')", None),
                                 (f"{named}, HyCD x start's scale", own_scale), (f"{named}, HyCD x 1", 1.0)]:
                rows.append({"label": label, "kind": "refine", "hycd_logit_scale": scale, "lr": lr,
                             "temperature": None if scale is None else 1.0 / scale,
                             "spec": self.refine_spec(start, scale, lr)})
        return rows

    def budget_of(self, spec: TrainSpec) -> Budget:
        """What the trainer gets for ``spec`` (the start budget with the spec's overrides)."""
        return Budget(**{**self.start_budget.__dict__, **spec.budget_override})


def learned_logit_scale(checkpoint: Path) -> float:
    """exp(logit_scale) of a trainer checkpoint (the model's learned inverse temperature); read with the
    tensors-only reader, a file that is no checkpoint refused in one line (``ModelLoadError``)."""
    from openclip_align.model_loading import read_checkpoint

    state = read_checkpoint(str(checkpoint), "--start")
    weights = state.get("state_dict", state) if isinstance(state, dict) else state
    for key in ("logit_scale", "module.logit_scale", "_orig_mod.logit_scale", "module._orig_mod.logit_scale"):
        if key in weights:
            return float(torch.as_tensor(weights[key]).float().exp())
    raise ValueError(f"{checkpoint} has no logit_scale in its state_dict: not a CLIP checkpoint this study can start from")


def scores(metrics: Dict[str, float]) -> Dict[str, float]:
    return {**score(metrics), "alignment_score": metrics["alignment_score"]}


def _train_row(plan: TemperaturePlan, row: dict, data_dir: Path, runs_dir: Path) -> dict:
    """Train and score one row; a diverged or failed run is recorded, never raised."""
    spec = row.pop("spec")
    row.update(argv_extra=spec.extra, budget=plan.budget_of(spec).__dict__)
    return {**row, **train_and_score(spec, plan.model, plan.start_budget, plan.seed, data_dir, runs_dir, scores)}


def run_temperature_study(data_dir: Path, out_dir: Path, plan: Optional[TemperaturePlan] = None,
                          command: str = "") -> dict:
    plan = plan or TemperaturePlan()
    check_corpus(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    started = time.time()
    if plan.start is None:
        spec = plan.start_spec()
        logging.info("temperature study: training the start model (%s --loss clip, %d epochs)", plan.model,
                     plan.start_budget.epochs)
        start = train(spec, str(data_dir / "train.csv"), plan.start_budget, plan.seed, runs_dir, progress=True).checkpoint
        start_record = {"trained": True, "argv_extra": spec.extra, "budget": plan.start_budget.__dict__}
    else:
        start, start_record = Path(plan.start), {"trained": False}
    own_scale = learned_logit_scale(start)
    logging.info("temperature study: start model %s, learned logit scale %.3f (T = %.4f)", start, own_scale,
                 1 / own_scale)
    start_row = {"label": "start CLIP", "kind": "start", "temperature": 1.0 / own_scale, "logit_scale": own_scale,
                 "status": "ok", "checkpoint": str(start), **start_record,
                 **scores(evaluate_model(plan.model, start, data_dir, device=plan.start_budget.device))}
    rows = [start_row]
    for row in plan.rows(start, own_scale):
        logging.info("temperature study: %s", row["label"])
        rows.append(_train_row(plan, row, data_dir, runs_dir))
        logging.info("temperature study: %s", rows[-1]["status"])
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command or f"openclip-align study --data {data_dir} --temperatures "
                              + " ".join(f"{t:g}" for t in plan.temperatures),
        "plan": {"model": plan.model, "extra": plan.extra, "seed": plan.seed, "temperatures": plan.temperatures,
                 "start": str(plan.start) if plan.start else "trained (the benchmark's pretrained-track CLIP row)",
                 "start_budget": plan.start_budget.__dict__, "finetune": plan.finetune, "refine": plan.refine,
                 "refine_lrs": plan.refine_lrs,
                 "refine_extra": REFINE_EXTRA, "data": str(data_dir)},
        "start": {"checkpoint": str(start), "logit_scale": own_scale, "temperature": 1.0 / own_scale},
        "rows": rows,
        "reference": {**MIND_THE_GAP, "gaps": [[t, g] for t, g in MIND_THE_GAP["gaps"].items()]},
        "seconds": time.time() - started,
    }
    write_json_atomic(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "temperature.png")
    return results


def _setting(row: dict) -> str:
    if row["kind"] == "start":
        return f"learned: T = {row['temperature']:.4g} (scale {row['logit_scale']:.3g})"
    if row["kind"] == "fixed temperature":
        return f"T = {row['temperature']:g}"
    scale = row.get("hycd_logit_scale")
    return "raw features (no scale)" if scale is None else f"S = {scale:.3g} (T = {1 / scale:.3g})"


def table_lines(results: dict) -> List[str]:
    """The rows as a markdown table (also README's block): gap and alignment score, R@1 and zero-shot in %."""
    lines = ["| row | T or scale | centroid gap | alignment score | I→T R@1 | T→I R@1 | zero-shot top-1 |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        if row["status"] != "ok":
            reason = f" ({row['reason']})" if row.get("reason") else ""
            lines.append(f"| {row['label']} | {_setting(row)} | {row['status']}{reason} | | | | |")
            continue
        cells = [f"{row['centroid_gap']:.3f}", f"{row['alignment_score']:.3f}",
                 *(f"{row[key] * 100:.1f}" for key in COLUMNS[2:])]
        lines.append(f"| {row['label']} | {_setting(row)} | " + " | ".join(cells) + " |")
    return lines


def title(results: dict) -> str:
    plan = results["plan"]
    finetune = plan["finetune"]
    return (f"{plan['model']}, seed {plan['seed']}; each T: {finetune['epochs']} epoch at lr {finetune['lr']:g}, "
            f"warm-up {finetune['warmup']}, batch {plan['start_budget']['batch_size']}; CLIP-Refine: the authors' "
            f"recipe (lr {plan['refine']['lr']:g}, batch {plan['refine']['batch_size']}, {plan['refine']['epochs']} "
            f"epoch){_other_lrs(plan)}")


def _other_lrs(plan: dict) -> str:
    others = [lr for lr in plan.get("refine_lrs", []) if lr != plan["refine"]["lr"]]
    return f", and the same recipe at lr {', '.join(f'{lr:g}' for lr in others)}" if others else ""


def reference_line(results: dict) -> str:
    ref = results["reference"]
    gaps = ", ".join(f"{g:.2f} at T = {_fraction(t)}" for t, g in ref["gaps"])
    return (f"Mind the Gap's published gaps ({ref['model']} fine-tuned on {ref['data']}, from {ref['start_gap']:.2f}): "
            f"{gaps}.")


def _fraction(t: float) -> str:
    return "1" if t == 1 else f"1/{round(1 / t)}"


def markdown(results: dict) -> str:
    lines = [f"# Temperature study ({title(results)})", "", f"Command: `{results['command']}`  ",
             f"Start model: `{results['start']['checkpoint']}`, learned logit scale {results['start']['logit_scale']:.3f} "
             f"(T = {results['start']['temperature']:.4f}). Centroid gap and alignment score on the held-out pairs; "
             "R@1 on them and zero-shot top-1 averaged over the zero-shot sets, in %.", "", *table_lines(results),
             "", reference_line(results), "",
             f"Total time: {results['seconds'] / 60:.1f} min. Figure: `temperature.png`.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Three panels against T (log axis): centroid gap (with Mind the Gap's curve), zero-shot top-1, R@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok"]
    fixed = sorted((r for r in rows if r["kind"] == "fixed temperature"), key=lambda r: r["temperature"])
    start = next((r for r in rows if r["kind"] == "start"), None)
    refine = [r for r in rows if r["kind"] == "refine"]
    panels = [("centroid gap", [("centroid_gap", "fine-tuned at T", 1)]),
              ("zero-shot top-1 (%)", [("zeroshot_top1", "fine-tuned at T", 100)]),
              ("held-out R@1 (%)", [("image_to_text_R@1", "I→T, fine-tuned at T", 100),
                                    ("text_to_image_R@1", "T→I, fine-tuned at T", 100)])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, series) in zip(axes, panels):
        for (key, label, scale), colour in zip(series, ("C0", "C1")):
            ax.plot([r["temperature"] for r in fixed], [r[key] * scale for r in fixed], "o-", color=colour,
                    label=label)
            if start is not None:
                ax.axhline(start[key] * scale, color=colour, ls=":", lw=1)
                ax.plot([start["temperature"]], [start[key] * scale], "*", ms=12, color=colour,
                        label=f"start model (learned T = {start['temperature']:.3g})" if colour == "C0" else None)
            ink = colour if len(series) > 1 else "C3"
            lrs = sorted({r.get("lr") for r in refine}, key=lambda lr: -1 if lr is None else lr)
            for r in refine:
                other = lrs.index(r.get("lr")) > 0       # a rate above the first: filled markers, dash-dot line
                if r["temperature"] is None:        # the authors' raw-feature HyCD has no temperature
                    ax.axhline(r[key] * scale, color=ink, ls="-." if other else "--", lw=1,
                               label=r["label"] if colour == "C0" else None)
                else:
                    marker = "s" if r["hycd_logit_scale"] == 1.0 else "D"
                    ax.plot([r["temperature"]], [r[key] * scale], marker, color=ink, mfc=ink if other else "none",
                            ms=8, label=f"{r['label']} (at T = 1/S)" if colour == "C0" else None)
        if series[0][0] == "centroid_gap":
            ref = results["reference"]
            ax.plot([t for t, _ in ref["gaps"]], [g for _, g in ref["gaps"]], "x--", color="grey",
                    label=f"Mind the Gap: theirs, {ref['model']} on {ref['data']} (from {ref['start_gap']:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("temperature T (log scale)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"Temperature study: {results['plan']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

