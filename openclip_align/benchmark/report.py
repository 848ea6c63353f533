"""Benchmark numbers -> mean +- std tables, regression flags, markdown and a figure."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

# metrics where smaller is better; every other quality metric is better when larger
LOWER_IS_BETTER = {"centroid_gap", "rmg", "uniformity_joint", "separability", "crossstyle_drop_R@1"}
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


def regressions(current: dict, previous: Optional[dict]) -> List[str]:
    """Quality rows that moved the wrong way by more than the seed spread; speed ratios that fell."""
    if not previous:
        return []
    flags = []
    for label, metrics in current["quality"].items():
        for metric, now in metrics.items():
            before = previous.get("quality", {}).get(label, {}).get(metric)
            if before is None:
                continue
            spread = max(now["std"], before["std"])
            change = now["mean"] - before["mean"]
            worse = change > spread if metric in LOWER_IS_BETTER else -change > spread
            if worse:
                flags.append(f"{label} {metric}: {before['mean']:.4f} -> {now['mean']:.4f} "
                             f"(beyond the seed spread {spread:.4f})")
    for label, now in current["speed"].items():
        before = previous.get("speed", {}).get(label)
        if before and now["ratio_to_upstream"] < before["ratio_to_upstream"] * (1 - SPEED_TOLERANCE):
            flags.append(f"{label} speed ratio: {before['ratio_to_upstream']:.3f} -> {now['ratio_to_upstream']:.3f}")
    return flags


def write_json_atomic(path: Path, data: dict) -> None:
    """Never leave a half-written results.json (the previous one is the regression baseline)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _cell(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


QUALITY_COLUMNS = [
    ("alignment_score", "align. score ↑", 1, 3), ("centroid_gap", "centroid gap ↓", 1, 3), ("rmg", "RMG ↓", 1, 3),
    ("uniformity_joint", "uniformity ↓", 1, 2), ("image_to_text_R@1", "I→T R@1 %", 100, 1),
    ("image_to_text_R@5", "I→T R@5 %", 100, 1), ("text_to_image_R@1", "T→I R@1 %", 100, 1),
    ("text_to_image_R@5", "T→I R@5 %", 100, 1), ("crossstyle_drop_R@1", "cross-style drop R@1 % ↓", 100, 1),
]


def markdown(results: dict) -> str:
    quality = results["quality"]
    labels = list(quality)
    zero_shot = sorted({m for label in labels for m in quality[label] if m.startswith("zeroshot_")})
    columns = [c for c in QUALITY_COLUMNS if c[0] in quality[labels[0]]] + \
        [(m, m.replace("zeroshot_", "zero-shot ").replace("_top1", " top-1 %"), 100, 1) for m in zero_shot]
    plan = results["plan"]
    lines = [
        "# openclip-align benchmark",
        "",
        f"Command: `{results['command']}` ({results['created']}, {results['machine']['device']}, "
        f"OpenCLIP {results['machine']['open_clip']}). Data: {plan['train_pairs']} training pairs; "
        f"{plan['budget']['epochs']} epochs, batch {plan['budget']['batch_size']}, lr {plan['budget']['lr']}, "
        f"seeds {plan['seeds']} (mean ± std over seeds).",
        "",
        "## Quality (held-out pairs; zero-shot sets)",
        "",
        "| model | " + " | ".join(c[1] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label in labels:
        cells = [_cell(quality[label][key], scale, digits) if key in quality[label] else "–"
                 for key, _, scale, digits in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed (training samples/s, same run)", "",
              "| configuration | samples/s | ratio to upstream CLIP | peak RSS MB | peak GPU MB |", "|---|---|---|---|---|"]
    for label, s in results["speed"].items():
        cuda = f"{s['peak_cuda_mb']:.0f}" if s["peak_cuda_mb"] is not None else "–"
        lines.append(f"| {label} | {s['samples_per_second']:.1f} | {s['ratio_to_upstream']:.3f} | "
                     f"{s['peak_rss_mb']:.0f} | {cuda} |")
    for label, reason in results.get("skipped", {}).items():
        lines.append(f"| {label} | not run: {reason} | | | |")
    lines += ["", f"Modality-gap report on 100k pairs of 768-d: {results['metric_seconds_100k_pairs_768d']:.2f} s.",
              f"Total training time: {results['train_seconds'] / 60:.1f} min.", "", "## Regressions against the previous run", ""]
    if results.get("compared_with") is None:
        lines.append(f"No earlier `{results.get('variant', '?')}` run to compare with.")
    else:
        lines.append(f"Compared with the `{results['variant']}` run of {results['compared_with']}:")
        lines += [f"- ⚠ {flag}" for flag in results["flags"]] or ["None flagged."]
    lines += ["", "Figures: `figures/quality.png` and one `figures/pca_<model>.png` per model.", ""]
    return "\n".join(lines)


def plot_quality(results: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = results["quality"]
    labels = list(quality)
    metrics = [m for m in ("alignment_score", "centroid_gap", "image_to_text_R@1", "text_to_image_R@1")
               if m in quality[labels[0]]]
    metrics += sorted(m for m in quality[labels[0]] if m.startswith("zeroshot_"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [quality[label][metric]["mean"] for label in labels]
        stds = [quality[label][metric]["std"] for label in labels]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=["#888", "#4c72b0", "#dd8452", "#55a868"][:len(labels)])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
