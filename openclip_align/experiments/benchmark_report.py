"""Benchmark numbers -> mean +- std tables, regression flags (same corpus only) and markdown."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from openclip_align.atomic_files import atomic_write_text

from .initialisation import initialisation_lines

# metrics where smaller is better; every other quality metric is better when larger
LOWER_IS_BETTER = {"centroid_gap", "centroid_gap_sq_per_dim", "rmg", "uniformity_joint", "separability",
                   "crossstyle_drop_R@1", "top2_variance_share_image", "top2_variance_share_text"}
# descriptive numbers with no better direction: never flagged
NEUTRAL = {"mean_norm_image", "mean_norm_text", "centroid_gap_sq_per_dim_raw"}
SPEED_TOLERANCE = 0.05          # a speed ratio more than 5% below the previous run's is flagged
# how a post-hoc row reads after its trained row's label ("CLIP + centring"), by transform
POSTHOC_NAMES = {"centre": "centring", "standardise": "standardising", "shift": "gap shift"}


def posthoc_label(label: str, kind: str) -> str:
    """The row of ``label``'s embeddings after the post-hoc transform ``kind`` (no training)."""
    return f"{label} + {POSTHOC_NAMES[kind]}"


def posthoc_base(label: str) -> Optional[str]:
    """The trained row a post-hoc row transforms (None for a trained row)."""
    for name in POSTHOC_NAMES.values():
        if label.endswith(f" + {name}"):
            return label[:-len(f" + {name}")]
    return None


def posthoc_lines(track: dict) -> List[str]:
    """What the post-hoc rows are (empty for a run without them)."""
    plan = track["plan"].get("posthoc")
    if not plan or not plan.get("of"):
        return []
    return [f"Rows `+ centring`, `+ standardising`, `+ gap shift`: no training, the trained row's embeddings "
            f"transformed after the fact with statistics of its {plan['train_pairs']:,} training pairs only "
            "(images get the image side, captions and zero-shot class prompts the text side, then every "
            "embedding is re-normalised): centring subtracts each modality's mean (Zhang et al. 2023), "
            "standardising also divides by each dimension's standard deviation (I0T), the gap shift moves images "
            f"by -λΔ and texts by +λΔ along the training gap vector Δ at λ = {plan['shift_lambda']:g}, the λ that "
            "makes the training centroids coincide before re-normalisation (Liang et al. 2022). They have no "
            "raw features, hence no raw norms.", ""]


def summarise_quality(per_seed: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, dict]]:
    table = {}
    for label, runs in per_seed.items():
        table[label] = {}
        for metric in runs[0]:
            values = [run[metric] for run in runs]
            table[label][metric] = {"mean": statistics.fmean(values),
                                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                    "values": values}
    return table


def _tracks(results: Optional[dict]) -> Dict[str, dict]:
    """Per-track results; a run from before tracks existed is its scratch track."""
    if not results:
        return {}
    return results["tracks"] if "tracks" in results else {"scratch": results}


def table_metrics(quality: dict) -> set:
    """The metrics the report's tables show for this quality table (nothing else is ever flagged)."""
    return {key for key, *_ in GEOMETRY_COLUMNS + DOWNSTREAM_COLUMNS + _zero_shot_columns(quality)}


def regressions(current: dict, previous: Optional[dict]) -> List[str]:
    """Table metrics that moved the wrong way by more than the seed spread; speed ratios that fell beyond
    their spread. Corpus agnostic: :func:`compare` calls it only for runs on the same corpus."""
    flags = []
    before_tracks = _tracks(previous)
    for name, track in _tracks(current).items():
        before_track = before_tracks.get(name)
        if not before_track:
            continue
        shown = table_metrics(track["quality"]) - NEUTRAL
        for label, metrics in track["quality"].items():
            for metric, now in metrics.items():
                before = before_track.get("quality", {}).get(label, {}).get(metric)
                if before is None or metric not in shown:
                    continue
                spread = max(now["std"], before["std"])
                change = now["mean"] - before["mean"]
                worse = change > spread if metric in LOWER_IS_BETTER else -change > spread
                if worse:
                    flags.append(f"{name} / {label} {metric}: {before['mean']:.4f} -> {now['mean']:.4f} "
                                 f"(beyond the seed spread {spread:.4f})")
        for label, now in track["speed"].items():
            before = before_track.get("speed", {}).get(label)
            if not before or now["ratio_to_upstream"] >= before["ratio_to_upstream"] * (1 - SPEED_TOLERANCE):
                continue
            if now.get("ratio_max") is not None and before.get("ratio_min") is not None \
                    and now["ratio_max"] >= before["ratio_min"]:
                continue               # the rounds' spreads overlap: not a measured slow-down
            flags.append(f"{name} / {label} speed ratio: {before['ratio_to_upstream']:.3f} -> "
                         f"{now['ratio_to_upstream']:.3f}")
    return flags


def compare(current: dict, previous: Optional[dict]) -> dict:
    """The regression check, like with like only: a baseline of other pairs, or one that did not record its
    corpus, is not compared (its status and the reason are kept instead of flags). On the same pairs, how the
    two builds differ (manifest format, package versions) is kept in ``differences`` for the report."""
    from .corpus_identity import same_corpus

    if previous is None:
        return {"comparison": {"status": "no baseline", "note": ""}, "compared_with": None, "flags": []}
    same, why, differences = same_corpus(current, previous)
    status = {True: "compared", False: "different corpus", None: "unknown corpus"}[same]
    flags = regressions(current, previous) if same else []
    return {"comparison": {"status": status, "note": why, "baseline_created": previous.get("created"),
                           "differences": differences},
            "compared_with": previous.get("created"), "flags": flags}


def write_json_atomic(path: Path, data: dict) -> None:
    """Never leave a half-written results.json (the previous one is the regression baseline); the file gets
    the umask's permissions like every other output."""
    atomic_write_text(path, json.dumps(data, indent=2))


def _cell(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


GEOMETRY_COLUMNS = [
    ("alignment_score", "align. score ↑", 1, 3), ("centroid_gap", "centroid gap ↓", 1, 3),
    ("centroid_gap_sq_per_dim", "gap²/d ×10³ ↓", 1e3, 3), ("rmg", "RMG ↓", 1, 3),
    ("uniformity_joint", "uniformity ↓", 1, 2), ("effective_rank_image", "eff. rank img ↑", 1, 1),
    ("effective_rank_text", "eff. rank txt ↑", 1, 1), ("top2_variance_share_image", "top-2 var. img % ↓", 100, 0),
    ("top2_variance_share_text", "top-2 var. txt % ↓", 100, 0), ("mean_norm_image", "raw norm img", 1, 1),
    ("mean_norm_text", "raw norm txt", 1, 1),
]
DOWNSTREAM_COLUMNS = [
    ("image_to_text_R@1", "I→T R@1 %", 100, 1), ("image_to_text_R@5", "I→T R@5 %", 100, 1),
    ("text_to_image_R@1", "T→I R@1 %", 100, 1), ("text_to_image_R@5", "T→I R@5 %", 100, 1),
    ("crossstyle_drop_R@1", "cross-style drop R@1 % ↓", 100, 1),
]


def _zero_shot_columns(quality: dict) -> list:
    keys = sorted({m for label in quality for m in quality[label] if m.startswith("zeroshot_")})
    return [(m, m.replace("zeroshot_", "zero-shot ").replace("_top1", " top-1 %"), 100, 1) for m in keys]


def _table(quality: dict, columns: list) -> List[str]:
    columns = [c for c in columns if any(c[0] in quality[label] for label in quality)]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, metrics in quality.items():
        cells = [_cell(metrics[key], scale, digits) if key in metrics else "–" for key, _, scale, digits in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def speed_table(speed: dict, skipped: Optional[dict] = None, baseline: str = "upstream CLIP") -> List[str]:
    spread = any("ratio_min" in s for s in speed.values())
    ratio = f"ratio to {baseline}" + (" (median [min–max] over rounds)" if spread else "")
    lines = [f"| configuration | samples/s | {ratio} | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|"]
    for label, s in speed.items():
        cuda = f"{s['peak_cuda_mb']:.0f}" if s["peak_cuda_mb"] is not None else "–"
        cell = f"{s['ratio_to_upstream']:.3f}"
        if "ratio_min" in s:
            cell += f" [{s['ratio_min']:.3f}–{s['ratio_max']:.3f}]"
        lines.append(f"| {label} | {s['samples_per_second']:.1f} | {cell} | {s['peak_rss_mb']:.0f} | {cuda} |")
    for label, reason in (skipped or {}).items():
        lines.append(f"| {label} | not run: {reason} | | | |")
    return lines


def speed_heading(track: dict) -> List[str]:
    """What the speed table measured, and how busy the machine was (older runs: one run after another)."""
    method = track.get("speed_method")
    if not method:       # a run from before the speed windows, or one whose baseline window failed
        return ["Training speed (samples/s, same run):" if "speed_seconds" not in track else "Training speed:"]
    from .speed import conditions_line

    return [f"Training speed: every configuration in turn for {method['interleaved_rounds']} rounds of one short "
            f"window each (about {method['samples_per_window']} samples, at least {method['min_steps']} steps; the "
            "order rotates every round), ratio to the first row taken within each round; samples/s and ratio are "
            "medians over the rounds. Peak RSS is the training process's own (not its data-loader workers).",
            "", conditions_line(method)]


def track_tables(track: dict) -> List[str]:
    """The geometry, downstream and speed tables of one track (also what README shows)."""
    quality = track["quality"]
    budget = track["plan"]["budget"]
    baseline = next(iter(track["speed"]), "the baseline")
    return [
        f"{budget['epochs']} epochs, batch {budget['batch_size']}, lr {budget['lr']}, seeds {track['plan']['seeds']} "
        f"(mean ± std over seeds); training {track['train_seconds'] / 60:.1f} min, "
        + (f"speed windows {track['speed_seconds'] / 60:.1f} min, " if "speed_seconds" in track else "")
        + f"evaluation {track.get('eval_seconds', 0) / 60:.1f} min.",
        "", "Modality gap and embedding geometry (held-out pairs):", "", *_table(quality, GEOMETRY_COLUMNS),
        "", "Downstream (held-out retrieval, cross-style retrieval, zero-shot classification):", "",
        *_table(quality, DOWNSTREAM_COLUMNS + _zero_shot_columns(quality)),
        "", *posthoc_lines(track), *speed_heading(track), "", *speed_table(track["speed"], track.get("skipped"), baseline),
    ]


def markdown(results: dict) -> str:
    data = results.get("data", {})
    lines = [
        "# openclip-align benchmark",
        "",
        f"Command: `{results['command']}` ({results['created']}, {results['machine']['device']}, "
        f"OpenCLIP {results['machine']['open_clip']}). Data: {_corpus_text(results)}, caption "
        f"embeddings by {data.get('encoder')}. Total {results['total_seconds'] / 60:.1f} min. CLIP-Refine rows: "
        "the authors' recipe (AdamW lr 1e-6 constant, wd 0.1, 1 epoch, batch 512, fp32) on the track's trained CLIP.",
    ]
    for name, track in results["tracks"].items():
        lines += ["", f"## {track['title']}", "", *track_tables(track)]
    init = initialisation_lines(results.get("initialisation"))      # absent in runs from before the table
    if init:
        lines += ["", "## At initialisation", "", *init]
    lines += ["", f"Modality-gap report on 100k pairs of 768-d: {results['metric_seconds_100k_pairs_768d']:.2f} s.",
              "", "## Regressions against the baseline", "", *regression_lines(results),
              "", "Figures: `figures/quality.png` (bars: mean over seeds, error bars: ± one std over seeds) and one "
              "`figures/pca_<track>_<model>.png` per model (held-out pairs along their gap direction).", ""]
    return "\n".join(lines)


def regression_lines(results: dict) -> List[str]:
    variant = results.get("variant", "?")
    comparison = results.get("comparison")
    if comparison is None:              # a results.json from before corpus records
        if results.get("compared_with") is None:
            return [f"No earlier `{variant}` run to compare with."]
        return [f"Not shown: this run predates corpus records, so its check against the `{variant}` run of "
                f"{results['compared_with']} may have compared two different corpus builds (unknown corpus)."]
    if comparison["status"] == "no baseline":
        return [f"No `{variant}` baseline to compare with."]
    if comparison["status"] != "compared":
        return [f"Not compared with the `{variant}` baseline of {comparison['baseline_created']}: "
                f"{comparison['status']} ({comparison['note']}). Numbers from different corpus builds differ for "
                "that reason alone; publish a run on this corpus as the baseline to compare against it."]
    how = f"; {comparison['note']}" if comparison.get("note") else ""
    built = comparison.get("differences") or []
    lines = [f"Compared with the `{variant}` baseline of {comparison['baseline_created']} (same corpus{how})."]
    if built:
        lines += ["", "The two corpus builds differ in how they were made, not in their pairs: " + "; ".join(built)
                  + ".", ""]
    return lines + ["Flagged:"] + ([f"- ⚠ {flag}" for flag in results["flags"]] or ["None."])


def _corpus_text(results: dict) -> str:
    from .corpus_identity import corpus_of, describe

    record = corpus_of(results)
    return describe(record) if record else f"{results.get('data', {}).get('train_pairs')} training pairs"
