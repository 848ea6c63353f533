"""Benchmark numbers -> mean +- std tables, regression flags, markdown and a figure."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from openclip_align.atomic_files import atomic_write_text

# metrics where smaller is better; every other quality metric is better when larger
LOWER_IS_BETTER = {"centroid_gap", "centroid_gap_sq_per_dim", "rmg", "uniformity_joint", "separability",
                   "crossstyle_drop_R@1", "top2_variance_share_image", "top2_variance_share_text"}
# descriptive numbers with no better direction: never flagged
NEUTRAL = {"mean_norm_image", "mean_norm_text", "centroid_gap_sq_per_dim_raw"}
SPEED_TOLERANCE = 0.05          # a speed ratio more than 5% below the previous run's is flagged


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


def summarise_speed(trained, baseline_label: str) -> Dict[str, dict]:
    base = statistics.fmean(r.samples_per_second for r in trained[baseline_label])
    out = {}
    for label, results in trained.items():
        rate = statistics.fmean(r.samples_per_second for r in results)
        cuda = [r.peak_cuda_mb for r in results if r.peak_cuda_mb is not None]
        out[label] = {"samples_per_second": rate, "ratio_to_upstream": rate / base,
                      "peak_rss_mb": max(r.peak_rss_mb for r in results),
                      "peak_cuda_mb": max(cuda) if cuda else None,
                      "wall_seconds_per_run": statistics.fmean(r.wall_seconds for r in results)}
    return out


def _tracks(results: Optional[dict]) -> Dict[str, dict]:
    """Per-track results; a run from before tracks existed is its scratch track."""
    if not results:
        return {}
    return results["tracks"] if "tracks" in results else {"scratch": results}


def regressions(current: dict, previous: Optional[dict]) -> List[str]:
    """Quality rows that moved the wrong way by more than the seed spread; speed ratios that fell."""
    flags = []
    before_tracks = _tracks(previous)
    for name, track in _tracks(current).items():
        before_track = before_tracks.get(name)
        if not before_track:
            continue
        for label, metrics in track["quality"].items():
            for metric, now in metrics.items():
                before = before_track.get("quality", {}).get(label, {}).get(metric)
                if before is None or metric in NEUTRAL:
                    continue
                spread = max(now["std"], before["std"])
                change = now["mean"] - before["mean"]
                worse = change > spread if metric in LOWER_IS_BETTER else -change > spread
                if worse:
                    flags.append(f"{name} / {label} {metric}: {before['mean']:.4f} -> {now['mean']:.4f} "
                                 f"(beyond the seed spread {spread:.4f})")
        for label, now in track["speed"].items():
            before = before_track.get("speed", {}).get(label)
            if before and now["ratio_to_upstream"] < before["ratio_to_upstream"] * (1 - SPEED_TOLERANCE):
                flags.append(f"{name} / {label} speed ratio: {before['ratio_to_upstream']:.3f} -> "
                             f"{now['ratio_to_upstream']:.3f}")
    return flags


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
    lines = [f"| configuration | samples/s | ratio to {baseline} | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|"]
    for label, s in speed.items():
        cuda = f"{s['peak_cuda_mb']:.0f}" if s["peak_cuda_mb"] is not None else "–"
        lines.append(f"| {label} | {s['samples_per_second']:.1f} | {s['ratio_to_upstream']:.3f} | "
                     f"{s['peak_rss_mb']:.0f} | {cuda} |")
    for label, reason in (skipped or {}).items():
        lines.append(f"| {label} | not run: {reason} | | | |")
    return lines


def track_tables(track: dict) -> List[str]:
    """The geometry, downstream and speed tables of one track (also what README shows)."""
    quality = track["quality"]
    budget = track["plan"]["budget"]
    baseline = next(iter(track["speed"]))
    return [
        f"{budget['epochs']} epochs, batch {budget['batch_size']}, lr {budget['lr']}, seeds {track['plan']['seeds']} "
        f"(mean ± std over seeds); training {track['train_seconds'] / 60:.1f} min, evaluation "
        f"{track.get('eval_seconds', 0) / 60:.1f} min.",
        "", "Modality gap and embedding geometry (held-out pairs):", "", *_table(quality, GEOMETRY_COLUMNS),
        "", "Downstream (held-out retrieval, cross-style retrieval, zero-shot classification):", "",
        *_table(quality, DOWNSTREAM_COLUMNS + _zero_shot_columns(quality)),
        "", "Training speed (samples/s, same run):", "", *speed_table(track["speed"], track.get("skipped"), baseline),
    ]


def markdown(results: dict) -> str:
    data = results.get("data", {})
    lines = [
        "# openclip-align benchmark",
        "",
        f"Command: `{results['command']}` ({results['created']}, {results['machine']['device']}, "
        f"OpenCLIP {results['machine']['open_clip']}). Data: {data.get('train_pairs')} training pairs, caption "
        f"embeddings by {data.get('encoder')}. Total {results['total_seconds'] / 60:.1f} min. CLIP-Refine rows: "
        "the authors' recipe (AdamW lr 1e-6 constant, wd 0.1, 1 epoch, batch 512, fp32) on the track's trained CLIP.",
    ]
    for name, track in results["tracks"].items():
        lines += ["", f"## {track['title']}", "", *track_tables(track)]
    lines += ["", f"Modality-gap report on 100k pairs of 768-d: {results['metric_seconds_100k_pairs_768d']:.2f} s.",
              "", "## Regressions against the previous run", ""]
    if results.get("compared_with") is None:
        lines.append(f"No earlier `{results.get('variant', '?')}` run to compare with.")
    else:
        lines.append(f"Compared with the `{results['variant']}` run of {results['compared_with']}:")
        lines += [f"- ⚠ {flag}" for flag in results["flags"]] or ["None flagged."]
    lines += ["", "Figures: `figures/quality.png` and one `figures/pca_<track>_<model>.png` per model.", ""]
    return "\n".join(lines)


def plot_quality(results: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = list(results["tracks"].items())
    rows = []
    for name, track in tracks:
        quality = track["quality"]
        labels = list(quality)
        metrics = [m for m in ("alignment_score", "centroid_gap", "effective_rank_image", "image_to_text_R@1",
                               "text_to_image_R@1") if m in quality[labels[0]]]
        metrics += sorted(m for m in quality[labels[0]] if m.startswith("zeroshot_"))
        rows.append((name, quality, labels, metrics))
    width = max(len(r[3]) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(3.0 * width, 3.4 * len(rows)), squeeze=False)
    colours = ["#888", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for row_axes, (name, quality, labels, metrics) in zip(axes, rows):
        for ax in row_axes[len(metrics):]:
            ax.axis("off")
        for ax, metric in zip(row_axes, metrics):
            means = [quality[label][metric]["mean"] for label in labels]
            stds = [quality[label][metric]["std"] for label in labels]
            ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=colours[:len(labels)])
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{name}: {metric}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
