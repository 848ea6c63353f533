"""The data-scaling study: does AlignCLIP's distance to CLIP shrink, hold or grow as the training pairs grow?

The benchmark's scratch track (upstream CLIP, SharedCLIP, AlignCLIP: the same models, flags and budget as
:func:`.benchmark.scratch_track`) trained on nested subsets of the corpus's training pairs, 1/4, 1/2 and all by
default, every row and seed on the same subset and scored on the same held-out pairs and zero-shot sets. The
budget is the track's epochs, so a smaller subset also means fewer steps, as a smaller corpus would.

Subsets are nested (1/4 inside 1/2 inside all) and fixed: one permutation of the training rows drawn from
:data:`SUBSET_SEED`, never from the training seed, and each fraction keeps its first ``floor(f * N)`` rows. A
subset is written as a csv (index renumbered 0..n-1) with the matching rows of the caption embeddings beside
it; the full fraction trains on the corpus's own train.csv.

Output: ``results.json``, ``results.md`` and ``scaling.png`` in the study's folder; ``results.json`` is
rewritten after every run, and a rerun with the same plan into the same folder keeps the runs already done.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .benchmark_report import write_json_atomic
from .corpus_identity import corpus_record
from .grid_study import check_corpus, score, train_and_score

DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2)             # the benchmark's seeds
SUBSET_SEED = 20261205                # which pairs a fraction keeps: fixed, independent of the training seeds
ROWS = ("upstream CLIP", "SharedCLIP", "AlignCLIP")
BASELINE, CANDIDATE = "upstream CLIP", "AlignCLIP"
METRICS = ("retrieval_R@1", "zeroshot_top1", "centroid_gap")
VERDICTS = {"holds": "the change is within the seed spread", "shrinks": "by more than the seed spread",
            "grows": "by more than the seed spread", "reverses": "it changes sign, by more than the seed spread"}
METRIC_NAMES = {"retrieval_R@1": "held-out R@1 (mean of both directions)", "zeroshot_top1": "zero-shot top-1",
                "centroid_gap": "centroid gap"}
# Conceptual 12M (Changpinyo et al., CVPR 2021): about 12.4 million image-text pairs as released (fewer download)
CC12M_PAIRS = 12_400_000
CC12M_SETUP = "ViT-B towers, 30 epochs, 8 GPUs x batch 512 (AlignCLIP's GitHub issue 4)"


def check_fractions(fractions: Sequence[float]) -> List[float]:
    """The fractions as sorted floats in (0, 1]; ValueError for none, one out of range, or a repeat."""
    values = sorted(float(f) for f in fractions)
    if not values:
        raise ValueError("--train-fractions needs at least one fraction")
    bad = [f for f in values if not 0 < f <= 1]
    if bad:
        raise ValueError(f"--train-fractions {' '.join(f'{f:g}' for f in bad)}: each fraction must lie in (0, 1]")
    if len(set(values)) != len(values):
        raise ValueError(f"--train-fractions {' '.join(f'{f:g}' for f in values)}: a fraction is repeated")
    return values


def subset_size(n_pairs: int, fraction: float) -> int:
    return n_pairs if fraction == 1 else int(math.floor(fraction * n_pairs))


def nested_subsets(n_pairs: int, fractions: Sequence[float], seed: int = SUBSET_SEED) -> Dict[float, np.ndarray]:
    """{fraction: sorted training rows}: the first floor(f * N) rows of one permutation drawn from ``seed``, so
    every smaller subset lies inside every larger one and the choice never depends on a training seed."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    return {f: np.sort(order[:subset_size(n_pairs, f)]) for f in check_fractions(fractions)}


def write_subset(data_dir: Path, rows: np.ndarray, folder: Path, name: str) -> Path:
    """``folder/NAME.csv`` with the corpus's training rows ``rows`` (index renumbered 0..n-1) and
    the matching rows of their caption embeddings beside it (:mod:`openclip_align.data.csv_embeddings`);
    returns the csv."""
    import pandas as pd

    from openclip_align.data import csv_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(data_dir / "train.csv", sep="\t", keep_default_na=False)
    subset = table.iloc[rows].copy()
    if "index" in subset.columns:
        subset["index"] = np.arange(len(subset))
    csv = folder / f"{name}.csv"
    subset.to_csv(csv, sep="\t", index=False)
    embeddings = Path(csv_embeddings.embedding_path(str(data_dir / "train.csv")))
    if embeddings.exists():
        column = np.load(embeddings, mmap_mode="r")
        if len(column) != len(table):
            raise ValueError(f"{embeddings}: {len(column)} rows for the {len(table)} pairs of train.csv; rebuild "
                             "the corpus (`make data`) or rerun `openclip-align embed`")
        meta_path = Path(csv_embeddings.meta_path(str(embeddings)))
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.update(n=int(len(rows)), subset_of=str(embeddings))
        csv_embeddings.write(csv_embeddings.embedding_path(str(csv)), column[rows], meta)
    return csv


def fraction_label(fraction: float) -> str:
    return "all" if fraction == 1 else (f"1/{round(1 / fraction)}" if abs(1 / fraction - round(1 / fraction)) < 1e-9
                                        else f"{fraction:g}")


@dataclass
class ScalingPlan:
    fractions: List[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    seeds: List[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    subset_seed: int = SUBSET_SEED
    rows: List[str] = field(default_factory=lambda: list(ROWS))
    device: str = "cpu"
    precision: str = "fp32"
    budget_override: Dict[str, object] = field(default_factory=dict)   # tests only: a smaller budget

    def __post_init__(self):
        self.fractions = check_fractions(self.fractions)

    def track(self, runs_dir: Path):
        """The benchmark's scratch track (CPU, full budget), on this plan's device and precision."""
        from .benchmark import scratch_track

        track = scratch_track(runs_dir, quick=False, gpu=False)
        track.budget = replace(track.budget, device=self.device, precision=self.precision, **self.budget_override)
        return track

    def cells(self, track) -> List[dict]:
        """Every run in order (smallest fraction first, so a stopped study has whole fractions): its fraction,
        seed, row, the spec the trainer gets and the model its checkpoint is scored as."""
        return [{"fraction": f, "seed": seed, "row": row, "spec": track.specs[row], "eval_model": track.eval_models[row]}
                for f in self.fractions for seed in self.seeds for row in self.rows]


def scores(metrics: Dict[str, float]) -> Dict[str, float]:
    out = score(metrics)
    return {**out, "retrieval_R@1": (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2}


def _stat(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(cells: List[dict], fractions: Sequence[float], rows: Sequence[str]) -> List[dict]:
    """One entry per (fraction, row): the finished seeds' mean and std of each metric."""
    table = []
    for f in fractions:
        for row in rows:
            runs = [c for c in cells if c["fraction"] == f and c["row"] == row]
            done = [c for c in runs if c["status"] == "ok"]
            entry = {"fraction": f, "row": row, "pairs": runs[0]["pairs"] if runs else None, "runs": len(runs),
                     "finished": len(done)}
            for key in METRICS if done else ():
                entry[key] = _stat([c[key] for c in done])
            table.append(entry)
    return table


def distances(cells: List[dict], fractions: Sequence[float]) -> List[dict]:
    """AlignCLIP minus upstream CLIP per fraction, paired by seed (same seed, same subset), for each metric."""
    out = []
    for f in fractions:
        by_seed = {}
        for c in cells:
            if c["fraction"] == f and c["status"] == "ok" and c["row"] in (BASELINE, CANDIDATE):
                by_seed.setdefault(c["seed"], {})[c["row"]] = c
        pairs = [p for _, p in sorted(by_seed.items()) if len(p) == 2]
        entry = {"fraction": f, "seeds": len(pairs),
                 "pairs": next((c["pairs"] for c in cells if c["fraction"] == f), None)}
        for key in METRICS if pairs else ():
            entry[key] = _stat([p[CANDIDATE][key] - p[BASELINE][key] for p in pairs])
        out.append(entry)
    return out


def trend(distance: List[dict], key: str) -> Optional[dict]:
    """How AlignCLIP - CLIP on ``key`` moves from the smallest to the largest fraction measured. The spread is
    sqrt(s1^2 + s2^2) of the two ends' seed standard deviations; a change within it "holds"; beyond it, the
    distance (its size) "shrinks" or "grows", or "reverses" when the sign flips."""
    ends = [d for d in distance if key in d]
    if len(ends) < 2:
        return None
    first, last = ends[0], ends[-1]
    a, b = first[key]["mean"], last[key]["mean"]
    spread = math.hypot(first[key]["std"], last[key]["std"])
    change = b - a
    if abs(change) <= spread:
        verdict = "holds"
    elif a * b < 0:
        verdict = "reverses"
    else:
        verdict = "shrinks" if abs(b) < abs(a) else "grows"
    return {"metric": key, "from_pairs": first["pairs"], "to_pairs": last["pairs"], "from": a, "to": b,
            "change": change, "spread": spread, "seeds": min(first["seeds"], last["seeds"]), "verdict": verdict}


def _points(value: float, key: str) -> str:
    return f"{value:+.3f}" if key == "centroid_gap" else f"{value * 100:+.1f} points"


def trend_sentence(item: dict) -> str:
    key = item["metric"]
    return (f"On {METRIC_NAMES[key]}, AlignCLIP minus CLIP goes from {_points(item['from'], key)} at "
            f"{item['from_pairs']:,} pairs to {_points(item['to'], key)} at {item['to_pairs']:,} (a change of "
            f"{_points(item['change'], key)}, seed spread {_spread(item['spread'], key)}): the distance "
            f"{item['verdict']} ({VERDICTS[item['verdict']]}).")


def _spread(value: float, key: str) -> str:
    return f"±{value:.3f}" if key == "centroid_gap" else f"±{value * 100:.1f} points"


def scope_sentence(results: dict) -> str:
    """What a trend over this corpus can and cannot say about CC12M, from the pair counts measured."""
    trends = [t for t in results["trend"] if t]
    if not trends:
        return "Too few fractions finished to measure a trend."
    low, high = trends[0]["from_pairs"], trends[0]["to_pairs"]
    verdicts = " and ".join(f"on {METRIC_NAMES[t['metric']]} {t['verdict']}" for t in trends
                            if t["metric"] != "centroid_gap")
    return (f"What this can say: on this corpus, with Tiny models from scratch and the benchmark's epochs, over a "
            f"{high / low:.0f}x range of training pairs ({low:,} to {high:,}) with {trends[0]['seeds']} seeds, "
            f"AlignCLIP's distance to CLIP {verdicts}. What it cannot say: CC12M has about "
            f"{CC12M_PAIRS / 1e6:.1f} million pairs, {CC12M_PAIRS / high:,.0f}x the largest set here, trained with "
            f"{CC12M_SETUP}; a direction over a {high / low:.0f}x range at this size is not an extrapolation to "
            "it (docs/notes.md sets AlignCLIP's own CC12M numbers beside these).")


def is_complete(results: dict) -> bool:
    plan = results["plan"]
    return len([c for c in results["cells"] if c["status"] in ("ok", "diverged", "failed")]) == \
        len(plan["fractions"]) * len(plan["seeds"]) * len(plan["rows"])


def _plan_record(plan: ScalingPlan, track, sizes: Dict[float, int], data_dir: Path) -> dict:
    return {"fractions": plan.fractions, "seeds": plan.seeds, "subset_seed": plan.subset_seed, "rows": plan.rows,
            "pairs": {f"{f:g}": n for f, n in sizes.items()}, "budget": track.budget.__dict__,
            "flags": {row: {"model": track.specs[row].model, "eval_model": track.eval_models[row],
                            "upstream": track.specs[row].upstream,
                            "loss": None if track.specs[row].upstream else track.specs[row].loss,
                            "extra": track.specs[row].extra} for row in plan.rows},
            "data": str(data_dir)}


def _load_meter() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_scaling_study(data_dir: Path, out_dir: Path, plan: Optional[ScalingPlan] = None, command: str = "") -> dict:
    import pandas as pd

    plan = plan or ScalingPlan()
    check_corpus(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    track = plan.track(runs_dir)
    n_pairs = len(pd.read_csv(data_dir / "train.csv", sep="\t", usecols=[0]))
    subsets = nested_subsets(n_pairs, plan.fractions, plan.subset_seed)
    sizes = {f: len(rows) for f, rows in subsets.items()}
    too_small = [f for f, n in sizes.items() if n < track.budget.batch_size]
    if too_small:
        raise ValueError(f"--train-fractions {' '.join(f'{f:g}' for f in too_small)}: fewer pairs than one batch "
                         f"({track.budget.batch_size}) of the {n_pairs} in {data_dir / 'train.csv'}; use larger fractions")
    train_csv = {f: data_dir / "train.csv" if f == 1 else
                 write_subset(data_dir, rows, out_dir / "subsets", f"train-{f:g}") for f, rows in subsets.items()}
    record = _plan_record(plan, track, sizes, data_dir)
    corpus = corpus_record(data_dir)          # once: without a content hash in the manifest it reads every file
    previous, earlier = _previous_cells(out_dir / "results.json", record)
    began = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    started = time.time() - (earlier or {}).get("seconds", 0.0)        # a continued study counts its earlier time
    machine = {"cpus": os.cpu_count(), "started": began, "load_at_start": _load_meter(), "load_per_run": []}
    if earlier:                        # the sessions before this one, as they were recorded
        before = earlier["machine"]
        machine["earlier_sessions"] = before.pop("earlier_sessions", []) + [before]
    cells = []
    for cell in plan.cells(track):
        f, seed, row = cell["fraction"], cell["seed"], cell["row"]
        key = (f, seed, row)
        if key in previous:
            cells.append(previous[key])
            continue
        logging.info("scaling study: %s on %s of the pairs (%d), seed %d", row, fraction_label(f), sizes[f], seed)
        machine["load_per_run"].append(_load_meter())
        outcome = train_and_score(cell["spec"], cell["eval_model"], track.budget, seed, data_dir, runs_dir, scores,
                                  train_csv=train_csv[f], name=f"{row}-{f:g}-seed{seed}".replace(" ", "_"))
        outcome.pop("checkpoint", None)
        cells.append({"fraction": f, "pairs": sizes[f], "seed": seed, "row": row, **outcome})
        logging.info("scaling study: %s", cells[-1]["status"])
        _write(out_dir, command, record, corpus, cells, machine, started, plan)
    return _write(out_dir, command, record, corpus, cells, machine, started, plan, final=True)


def _previous_cells(path: Path, record: dict) -> tuple:
    """Runs a stopped study with the same plan already finished (a rerun continues it), and its results."""
    if not path.exists():
        return {}, None
    old = json.loads(path.read_text())
    if old.get("plan") != json.loads(json.dumps(record)):
        return {}, None
    done = {(c["fraction"], c["seed"], c["row"]): c for c in old["cells"] if c["status"] in ("ok", "diverged")}
    return done, (old if done else None)


def _write(out_dir: Path, command: str, record: dict, corpus: dict, cells: List[dict], machine: dict,
           started: float, plan: ScalingPlan, final: bool = False) -> dict:
    machine = {**machine, "load_at_end": _load_meter(), "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    distance = distances(cells, plan.fractions)
    results = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command or f"openclip-align study --data {record['data']} --train-fractions "
                              + " ".join(f"{f:g}" for f in plan.fractions),
        "plan": record, "corpus": corpus, "machine": machine, "cells": cells,
        "table": summarise(cells, plan.fractions, plan.rows), "distance": distance,
        "trend": [trend(distance, key) for key in METRICS],
        "seconds": time.time() - started,
    }
    results["complete"] = is_complete(results)
    write_json_atomic(out_dir / "results.json", results)
    if final:
        (out_dir / "results.md").write_text(markdown(results))
        plot(results, out_dir / "scaling.png")
    return results


def _fmt(stat: dict, key: str) -> str:
    """mean ± std (R@1 and zero-shot in %); no spread for a single seed."""
    scale, digits = (1, 3) if key == "centroid_gap" else (100, 1)
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if len(stat["values"]) > 1 else "")


def table_lines(results: dict) -> List[str]:
    """Per fraction and row: mean ± std over seeds (R@1 and zero-shot in %), then AlignCLIP - CLIP by seed."""
    lines = ["| training pairs | row | seeds | held-out R@1 | zero-shot top-1 | centroid gap |", "|---|---|---|---|---|---|"]
    for e in results["table"]:
        where = f"{e['pairs']:,} ({fraction_label(e['fraction'])})" if e["pairs"] else fraction_label(e["fraction"])
        if not e["finished"]:
            lines.append(f"| {where} | {e['row']} | 0 of {e['runs']} | not run | | |")
            continue
        lines.append(f"| {where} | {e['row']} | {e['finished']} of {e['runs']} | "
                     + " | ".join(_fmt(e[k], k) for k in METRICS) + " |")
    for d in results["distance"]:
        if d["seeds"]:
            lines.append(f"| {d['pairs']:,} ({fraction_label(d['fraction'])}) | AlignCLIP − CLIP, by seed | "
                         f"{d['seeds']} | " + " | ".join(_fmt(d[k], k) for k in METRICS) + " |")
    return lines


def conditions_line(results: dict) -> str:
    """When, on how many cores and under what load the runs ran, over every session of a continued study."""
    m = results["machine"]
    sessions = [*m.get("earlier_sessions", []), m]
    loads = [l[0] for s in sessions for l in s.get("load_per_run", []) if l]
    load = (f"1-minute load average {min(loads):.1f} to {max(loads):.1f} at the runs' starts" if loads else
            "load not recorded")
    spans = "; ".join(f"{s['started']} to {s['ended']}" for s in sessions)
    return (f"Ran {spans} on {m['cpus']} CPU cores, {load} (quality numbers do not depend on load); "
            f"{results['seconds'] / 60:.0f} min" + (f" in {len(sessions)} sessions." if len(sessions) > 1 else "."))


def title(results: dict) -> str:
    plan = results["plan"]
    b = plan["budget"]
    return (f"the benchmark's scratch track, {b['epochs']} epoch{'s' if b['epochs'] != 1 else ''} at batch {b['batch_size']}, lr {b['lr']:g}, on "
            f"nested subsets of the training pairs (subset seed {plan['subset_seed']}), seeds {plan['seeds']}")


def markdown(results: dict) -> str:
    lines = [f"# Data-scaling study ({title(results)})", "", f"Command: `{results['command']}`  ",
             conditions_line(results), "",
             "R@1 on the held-out pairs (mean of image→text and text→image) and zero-shot top-1 averaged over the "
             "zero-shot sets, in %, mean ± std over seeds; the last rows are AlignCLIP minus upstream CLIP paired "
             "by seed.", "", *table_lines(results), "", *summary_lines(results)]
    if not results.get("complete", True):
        lines += ["", "**Incomplete**: not every run finished; rerun the same command into the same folder to "
                      "continue it."]
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {c['row']} at {c['pairs']} pairs, seed {c['seed']}: {c['reason']}"
                                         for c in failed]
    lines += ["", "Figure: `scaling.png`.", ""]
    return "\n".join(lines)


SPREAD_NOTE = ("Seed spread: sqrt(s1² + s2²) of the standard deviations over seeds of AlignCLIP minus CLIP at the "
               "smallest and the largest fraction; a change within it is read as no change.")


def summary_lines(results: dict) -> List[str]:
    """One paragraph per metric's trend, then what it can and cannot say about CC12M."""
    lines = [SPREAD_NOTE, ""]
    for item in (t for t in results["trend"] if t):
        lines += [trend_sentence(item), ""]
    return lines + [scope_sentence(results)]


def check_publishable(results: dict, where: Path) -> None:
    if not results.get("complete"):
        raise SystemExit(f"{where}/results.json: the scaling study did not finish every run; rerun the same "
                         "command into the same --out (it keeps the runs done) before publishing")


def readme_block(results: dict) -> str:
    return "\n".join([f"From `{results['command']}`, {results['created']} ({title(results)}). "
                      + conditions_line(results), "", *table_lines(results), "", *summary_lines(results), "",
                      "![data-scaling study](study/scaling/scaling.png)"])


def plot(results: dict, path: Path) -> Path:
    """Three panels against training pairs (log axis): R@1, zero-shot top-1, centroid gap; mean ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key in zip(axes, METRICS):
        scale = 1 if key == "centroid_gap" else 100
        for i, row in enumerate(results["plan"]["rows"]):
            entries = [e for e in results["table"] if e["row"] == row and e["finished"]]
            if not entries:
                continue
            ax.errorbar([e["pairs"] for e in entries], [e[key]["mean"] * scale for e in entries],
                        yerr=[e[key]["std"] * scale for e in entries], marker="os^"[i % 3], capsize=3, label=row)
            for e in entries:
                ax.plot([e["pairs"]] * len(e[key]["values"]), [v * scale for v in e[key]["values"]], ".",
                        color=f"C{i}", alpha=0.35, ms=4)
        ax.set_xscale("log", base=2)
        ticks = sorted({e["pairs"] for e in results["table"] if e["finished"]})
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training pairs (log scale)")
        ax.set_title(METRIC_NAMES[key] + ("" if key == "centroid_gap" else " (%)"), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Data scaling: mean ± std over seeds (dots: each seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
