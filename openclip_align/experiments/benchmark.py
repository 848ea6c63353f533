"""The benchmark: train every configuration of each track with one budget, evaluate, write the report.

Two tracks, each a table of its own (every run is a real ``python -m open_clip_train.main`` process
with identical data, steps, batch, schedule and seed within the track):

* ``scratch``: small models trained from random weights. Upstream CLIP (OpenCLIP alone, a dual-tower
  config of about the same size), SharedCLIP (``--loss clip``), AlignCLIP (``--loss imsep``,
  precomputed caption embeddings) and CLIP-Refine on the trained upstream CLIP of the same seed.
* ``pretrained``: ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2 towers installed from packages
  (``DualCLIP-Lite0-MiniLM``), so downstream numbers sit above chance: the same model with
  ``--loss clip`` (upstream's loss), with ``--loss imsep``, and CLIP-Refine on the trained CLIP.

Every trained row but CLIP-Refine is also scored after each post-hoc gap-closing transform
(:mod:`openclip_align.metrics.posthoc`: centring, standardising, Mind the Gap's shift), fitted on that
checkpoint's own embeddings of the training pairs: rows without any training, next to the trained ones.
CLIP-Refine always runs the authors' recipe (:data:`REFINE_RECIPE`). Training speed is measured apart from
the training runs, with every configuration interleaved in short windows (:mod:`.speed`); a speed-only row
trains AlignCLIP with caption embeddings computed on the fly. After the tracks, the run measures the gap of
randomly initialised dual- and shared-tower models once (:mod:`.initialisation`).

Output goes to ``--out`` (``runs/benchmark`` by default, untracked); the committed copy under ``benchmark/``
changes only through :mod:`openclip_align.publishing.committed_copy`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import open_clip

from openclip_align.metrics.posthoc import POSTHOC_KINDS, closing_lambda

from . import benchmark_report, machine
from .benchmark_figures import pca_path, pca_title, plot_quality
from .corpus_identity import corpus_record, count_rows
from .initialisation import INIT_MODELS, measure_initialisation
from .regimes import PRETRAINED_LOCKS, PRETRAINED_MODEL, REGIMES
from .scoring import evaluate_with_posthoc, metric_time_100k
from .speed import LoadMeter, SpeedPlan, conditions_line, interleave, window_csv
from .trainer_processes import Budget, TrainResult, TrainSpec, train, write_local_dir_config

# CLIP-Refine as the authors' released code runs it: AdamW lr 1e-6 constant, weight decay 0.1, one epoch,
# fp32, batch 512 (it fits every CPU model here). Upstream exempts gains and biases from weight decay where
# the authors decay every parameter: at lr 1e-6 that is a relative change below 1e-4 over an epoch (see
# docs/training.md), so no flag for it.
REFINE_RECIPE = {"epochs": 1, "lr": 1e-6, "warmup": 0, "wd": 0.1, "batch_size": 512, "precision": "fp32"}
# torch's AdamW defaults, which the authors keep (open_clip_train would pick 0.98 / 1e-6 for ViTs)
REFINE_EXTRA = ["--lr-scheduler", "const", "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8"]
# The initialisation table (:mod:`.initialisation`): always 5 seeds; on a CPU the Tiny pair on every held-out
# pair, on a GPU the ViT-B-16 pair on the first 512; --quick caps the pairs, never the seeds.
INIT_SEEDS = (0, 1, 2, 3, 4)
INIT_LIMIT = {"cpu": None, "cuda": 512}
INIT_QUICK_LIMIT = 256
INIT_CPU_NOTE = ("ViT-B-16 and SharedCLIP-ViT-B-16 at initialisation are measured by the GPU variant (`--gpu`) only: "
                 "on a CPU their 5 seeds do not fit the benchmark's time budget.")



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
    posthoc_of: List[str] = field(default_factory=list)   # rows also scored after each post-hoc transform

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
                 budget, refine_from="upstream CLIP", refine_model=baseline, speed_only=speed, posthoc_of=list(specs))


def pretrained_track(quick: bool) -> Track:
    budget = Budget(epochs=1 if quick else REGIMES["pretrained"].epochs, batch_size=64, lr=1e-3, warmup=20)
    specs = {
        "CLIP": TrainSpec("CLIP", PRETRAINED_MODEL, loss="clip", extra=list(PRETRAINED_LOCKS)),
        "AlignCLIP loss": TrainSpec("AlignCLIP loss", PRETRAINED_MODEL, loss="imsep",
                                    extra=[*PRETRAINED_LOCKS, "--semantic-source", "precomputed"]),
    }
    return Track("pretrained", f"Pretrained towers from packages ({PRETRAINED_MODEL})", specs,
                 {"CLIP": PRETRAINED_MODEL, "AlignCLIP loss": PRETRAINED_MODEL, "CLIP-Refine": PRETRAINED_MODEL},
                 budget, refine_from="CLIP", refine_model=PRETRAINED_MODEL, posthoc_of=list(specs))


TRACKS = ("scratch", "pretrained")


def eval_rows(track_name: str, track: dict) -> Dict[str, tuple]:
    """label -> (model its checkpoint loads into, loss, epochs) for the rows of a finished track's results."""
    plan = track["plan"]
    rows = {}
    for label, row in plan["rows"].items():
        upstream = str(row["model"]).startswith("local-dir:")
        model = _upstream_eval_model(plan) if upstream else row["model"]
        rows[label] = (model, "clip (OpenCLIP alone)" if upstream else row["loss"], plan["budget"]["epochs"])
    if "CLIP-Refine" in track["quality"]:
        first = next(iter(rows.values()))
        rows["CLIP-Refine"] = (first[0], "refine", plan.get("refine_recipe", REFINE_RECIPE)["epochs"])
    return rows


def _upstream_eval_model(plan: dict) -> str:
    budget = plan["budget"]
    return "ViT-B-16" if budget.get("device") == "cuda" else "DualCLIP-Tiny"


def measure_speed(track: Track, trained: Dict[str, List[TrainResult]], train_csv: Path, logs: Path,
                  plan: SpeedPlan) -> dict:
    """Every configuration of the track, interleaved in short windows (see :mod:`.speed`)."""
    specs = dict(track.specs)
    specs["CLIP-Refine"] = track.refine_spec(trained[track.refine_from][0].checkpoint)
    specs.update({spec.label: spec for spec in track.speed_only})
    available = count_rows(train_csv)
    csvs: Dict[int, Path] = {}
    memory: Dict[str, List[TrainResult]] = {}
    logging.info("benchmark %s: speed, %d rounds of one short window per configuration; window logs under %s",
                 track.name, plan.rounds, logs)

    def window(label: str, round_index: int) -> float:
        spec = specs[label]
        batch = Budget(**{**track.budget.__dict__, **spec.budget_override}).batch_size
        steps = plan.steps(batch, available)
        if batch * steps not in csvs:
            csvs[batch * steps] = window_csv(train_csv, batch * steps, logs)
        windowed = replace(spec, budget_override={**spec.budget_override, "epochs": 1, "log_every": 1})
        result = train(windowed, str(csvs[batch * steps]), track.budget, 0, logs,
                       name=f"{label}-round{round_index}", keep_checkpoint=False, skip_steps=plan.skipped_steps(steps))
        memory.setdefault(label, []).append(result)
        logging.info("benchmark %s: speed round %d/%d, %s: %.1f samples/s", track.name, round_index + 1, plan.rounds,
                     label, result.samples_per_second)
        return result.samples_per_second

    meter = LoadMeter()
    measured = interleave(list(specs), window, plan.rounds, track.refine_from)
    conditions = meter.stop()
    logging.info("benchmark %s: %s", track.name, conditions_line(conditions))
    speed = measured["speed"]
    for label, entry in speed.items():
        runs = memory[label] + trained.get(label, [])       # peak memory: the windows and the full training runs
        cuda = [r.peak_cuda_mb for r in runs if r.peak_cuda_mb is not None]
        entry.update(peak_rss_mb=max(r.peak_rss_mb for r in runs), peak_cuda_mb=max(cuda) if cuda else None)
        if label in trained:
            entry["wall_seconds_per_run"] = sum(r.wall_seconds for r in trained[label]) / len(trained[label])
    return {"speed": speed, "skipped": measured["skipped"],
            "speed_method": {"interleaved_rounds": plan.rounds, "samples_per_window": plan.samples,
                             "min_steps": plan.min_steps, "skipped_steps": plan.skip, **conditions}}


def parallel_runs_default(device: str) -> int:
    """Training runs side by side: on a CPU, one single-threaded run per core beats one run on all cores
    (small models leave cores idle inside a step and during start-up, data loading and saving; measured on
    2 cores: two Tiny runs 1.8x, two pretrained-tower runs 1.4x faster than one after the other). A GPU
    runs one at a time."""
    return max(1, min(2, os.cpu_count() or 1)) if device == "cpu" else 1


def train_side_by_side(track: Track, train_csv: Path, logs: Path, seeds: List[int],
                       parallel_runs: int) -> Dict[str, List[TrainResult]]:
    """Every (seed, configuration) training run and each seed's CLIP-Refine (started once that seed's
    ``refine_from`` run is done), ``parallel_runs`` at a time; results listed in seed order per label.
    Speed is measured separately afterwards (one window at a time), so sharing the cores here costs
    nothing but wall time."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    threads = 1 if parallel_runs > 1 else None
    total = len(seeds) * (len(track.specs) + 1)
    done: Dict[tuple, TrainResult] = {}
    started = [0]

    def run(label: str, spec, seed: int) -> TrainResult:
        started[0] += 1
        what = f"CLIP-Refine of {track.refine_from}" if label == "CLIP-Refine" else f"training {label}"
        logging.info("benchmark %s: run %d/%d, %s (seed %d)", track.name, started[0], total, what, seed)
        return train(spec, str(train_csv), track.budget, seed, logs, progress=True, threads=threads)

    # a ready CLIP-Refine goes before the base runs still waiting, so the track does not end on one lone run
    waiting = deque((label, spec, seed) for seed in seeds for label, spec in track.specs.items())
    with ThreadPoolExecutor(max_workers=parallel_runs) as pool:
        running = {}
        try:
            while waiting or running:
                while waiting and len(running) < parallel_runs:
                    label, spec, seed = waiting.popleft()
                    running[pool.submit(run, label, spec, seed)] = (label, seed)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    label, seed = running.pop(future)
                    done[(label, seed)] = future.result()
                    if label == track.refine_from:
                        waiting.appendleft(("CLIP-Refine", track.refine_spec(done[(label, seed)].checkpoint), seed))
        except BaseException:
            for future in running:
                future.cancel()
            raise
    labels = [*track.specs, "CLIP-Refine"]
    return {label: [done[(label, seed)] for seed in seeds] for label in labels}


def run_track(track: Track, train_csv: Path, data_dir: Path, out_dir: Path, runs_dir: Path,
              seeds: List[int], speed_plan: Optional[SpeedPlan] = None, parallel_runs: int = 1) -> dict:
    started = time.time()
    logs = runs_dir / track.name
    trained = train_side_by_side(track, train_csv, logs, seeds, parallel_runs)
    train_seconds = time.time() - started
    try:
        speed = measure_speed(track, trained, train_csv, logs / "speed", speed_plan or SpeedPlan())
    except RuntimeError as err:       # the baseline's window failed: keep the training runs, evaluate them
        lines = [line for line in str(err).splitlines() if line.strip()]
        logging.error("benchmark %s: speed not measured: %s", track.name, lines[-1] if lines else err)
        speed = {"speed": {}, "skipped": {f"speed of {track.refine_from}": (lines[-1] if lines else str(err))[:200]}}
    speed_seconds = time.time() - started - train_seconds

    quality: Dict[str, List[Dict[str, float]]] = {}
    figures = out_dir / "figures"
    figures.mkdir(exist_ok=True)
    logging.info("benchmark %s: evaluating %d checkpoints (post-hoc transforms of %s fitted on their training "
                 "pairs)", track.name, sum(map(len, trained.values())), ", ".join(track.posthoc_of))
    for label, results in trained.items():
        spec = track.specs.get(label)
        loss = "refine" if label == "CLIP-Refine" else ("clip (OpenCLIP alone)" if spec.upstream else spec.loss)
        kinds = POSTHOC_KINDS if label in track.posthoc_of else ()
        rows = {None: label, **{kind: benchmark_report.posthoc_label(label, kind) for kind in kinds}}
        for i, result in enumerate(results):
            first = i == 0
            titles = {kind: pca_title(track.title, row, track.eval_models[label], loss) for kind, row in rows.items()}
            paths = {kind: pca_path(figures, track.name, row) for kind, row in rows.items()} if first else {}
            scored = evaluate_with_posthoc(track.eval_models[label], result.checkpoint, data_dir, kinds,
                                           device=track.budget.device, plot_paths=paths, plot_titles=titles)
            for kind, row in rows.items():
                quality.setdefault(row, []).append(scored[kind])
    return {
        "title": track.title,
        "plan": {"seeds": seeds, "budget": track.budget.__dict__, "refine_recipe": REFINE_RECIPE,
                 "rows": {label: {"model": spec.model, "loss": spec.loss, "extra": spec.extra}
                          for label, spec in track.specs.items()},
                 "posthoc": {"of": list(track.posthoc_of), "kinds": list(POSTHOC_KINDS),
                             "fitted_on": "train.csv", "train_pairs": count_rows(train_csv),
                             "shift_lambda": closing_lambda(np.ones(1))}},
        "quality": benchmark_report.summarise_quality(quality),
        **speed,
        "train_seconds": train_seconds,
        "speed_seconds": speed_seconds,
        "eval_seconds": time.time() - started - train_seconds - speed_seconds,
    }


def run_benchmark(data_dir: Path, out_dir: Path, quick: bool = False, gpu: bool = False,
                  seeds: Optional[List[int]] = None, tracks=TRACKS, baseline: Optional[Path] = None,
                  parallel_runs: Optional[int] = None) -> dict:
    """Train, measure and evaluate every track into ``out_dir``; compare with ``baseline`` (a results.json or
    a folder of ``<variant>.json`` files, e.g. the committed ``benchmark/baselines``) when it exists."""
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
    parallel_runs = parallel_runs or parallel_runs_default("cuda" if gpu else "cpu")
    started = time.time()
    logging.info("benchmark: writing to %s; every run's live log is under %s", out_dir, runs_dir)
    corpus = corpus_record(data_dir)
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"openclip-align benchmark --data {data_dir}" + (" --quick" if quick else "")
                   + (" --gpu" if gpu else "") + ("" if list(tracks) == list(TRACKS) else f" --tracks {' '.join(tracks)}"),
        "machine": {"platform": platform.platform(), "device": "cuda" if gpu else "cpu",
                    "python": platform.python_version(), "open_clip": open_clip.__version__,
                    **machine.at_start()},
        "data": {"path": str(data_dir), "train_pairs": corpus["train_pairs"], "encoder": _encoder(data_dir),
                 "corpus": corpus},
        "tracks": {},
    }
    builders = {"scratch": lambda: scratch_track(runs_dir, quick, gpu), "pretrained": lambda: pretrained_track(quick)}
    # windows of 16 steps at the CPU batch of 64; 20 steps of 256 on a GPU (its steps take milliseconds)
    speed_plan = SpeedPlan(rounds=2 if quick else SpeedPlan.rounds, samples=20 * 256 if gpu else SpeedPlan.samples)
    for name in tracks:
        results["tracks"][name] = run_track(builders[name](), train_csv, data_dir, out_dir, runs_dir, seeds, speed_plan,
                                            parallel_runs)
        results["tracks"][name]["parallel_runs"] = parallel_runs
    results["initialisation"] = initialisation(data_dir, "cuda" if gpu else "cpu", quick)
    results["total_seconds"] = time.time() - started
    results["machine"] = machine.at_end(results["machine"])
    results["metric_seconds_100k_pairs_768d"] = metric_time_100k()
    # The regression baseline is a run of the same variant (a 1-epoch run says nothing about a 3-epoch one).
    variant = ("gpu" if gpu else "cpu") + ("-quick" if quick else "")
    results["variant"] = variant
    previous = load_baseline(baseline, variant)
    results.update(benchmark_report.compare(results, previous))
    benchmark_report.write_json_atomic(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(benchmark_report.markdown(results))
    plot_quality(results, out_dir / "figures" / "quality.png")
    return results


def initialisation(data_dir: Path, device: str, quick: bool) -> dict:
    """The initialisation table of this run (once per run, after the tracks); a failure is recorded, not
    raised, so the trained tracks still get their report."""
    limit = INIT_LIMIT[device]
    if quick:
        limit = min(limit or INIT_QUICK_LIMIT, INIT_QUICK_LIMIT)
    models = INIT_MODELS[device]
    logging.info("benchmark: %s at initialisation, %d seeds, %s held-out pairs", " and ".join(models),
                 len(INIT_SEEDS), "all" if limit is None else f"the first {limit}")
    try:
        init = measure_initialisation(data_dir, models, INIT_SEEDS, limit=limit, device=device)
    except Exception as err:            # noqa: BLE001 - the tracks' results matter more than this table
        logging.error("benchmark: initialisation not measured: %s", err)
        return {"skipped": f"{type(err).__name__}: {err}"[:200], "models_planned": list(models)}
    init.update(device=device, limit=limit)
    if device == "cpu":
        init["note"] = INIT_CPU_NOTE
    return init


def load_baseline(baseline: Optional[Path], variant: str) -> Optional[dict]:
    """A results.json to compare with: ``baseline`` itself, or ``baseline/<variant>.json`` for a folder."""
    if baseline is None:
        return None
    path = baseline / f"{variant}.json" if baseline.is_dir() else baseline
    if not path.exists():
        logging.info("benchmark: no baseline %s to compare with", path)
        return None
    return json.loads(path.read_text())


def _encoder(data_dir: Path) -> Optional[str]:
    manifest = data_dir / "manifest.json"
    if not manifest.exists():
        return None
    encoder = json.loads(manifest.read_text()).get("encoder")
    return encoder.get("model") if isinstance(encoder, dict) else None
