"""The benchmark's figures: quality bars per track, and each model's held-out pairs drawn along its gap.

The bar chart shows the numbers of the report's tables in the same units (recall and accuracy in %) with
a caption saying what the bars and error bars are; post-hoc rows are hatched bars in their trained row's
colour. The pair pictures use the ``gap`` command's figure
(:func:`openclip_align.metrics.plots.plot_gap_pca`) with the gap direction as the x axis, so the distance
between the two centroids along x is the centroid gap of the table, printed in the title.
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .benchmark_report import posthoc_base

# (metric, panel title, y-axis label, scale): the same units as the report's tables
QUALITY_PANELS = [
    ("alignment_score", "alignment score", "score (higher is better)", 1),
    ("centroid_gap", "centroid gap", "‖mean(img) − mean(txt)‖ (lower is better)", 1),
    ("effective_rank_image", "effective rank of image embeddings", "rank (higher is better)", 1),
    ("image_to_text_R@1", "image → text R@1", "R@1 % (higher is better)", 100),
    ("text_to_image_R@1", "text → image R@1", "R@1 % (higher is better)", 100),
]
BASELINE_COLOUR, REFINE_COLOUR = "#888888", "#55a868"      # the same in every track
COLOURS = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3"]


# post-hoc rows: their trained row's colour, lighter, hatched by transform
POSTHOC_HATCHES = {"centring": "//", "standardising": "..", "gap shift": "xx"}


def colours(labels: List[str]) -> List[str]:
    """Grey for the track's baseline (first row), green for CLIP-Refine, the rest in order; a post-hoc row
    takes the colour of the trained row it transforms."""
    others = iter(COLOURS * len(labels))
    trained = [label for label in labels if posthoc_base(label) is None]
    own = {label: BASELINE_COLOUR if i == 0 else REFINE_COLOUR if label == "CLIP-Refine" else next(others)
           for i, label in enumerate(trained)}
    return [own.get(posthoc_base(label) or label, BASELINE_COLOUR) for label in labels]


def hatch(label: str) -> Optional[str]:
    base = posthoc_base(label)
    return None if base is None else POSTHOC_HATCHES[label[len(base) + 3:]]


def panels(quality: dict) -> List[tuple]:
    """The panels one track's quality table fills (zero-shot sets as they come)."""
    present = set().union(*(metrics.keys() for metrics in quality.values()))
    chosen = [panel for panel in QUALITY_PANELS if panel[0] in present]
    for key in sorted(m for m in present if m.startswith("zeroshot_") and m.endswith("_top1")):
        name = key[len("zeroshot_"):-len("_top1")].replace("_", " ")
        chosen.append((key, f"zero-shot {name} top-1", "top-1 % (higher is better)", 100))
    return chosen


def caption(results: dict) -> str:
    seeds = sorted({len(track["plan"]["seeds"]) for track in results["tracks"].values()})
    count = " or ".join(str(n) for n in seeds)
    return (f"Bars: mean over {count} seeds (training seeds of each row); error bars: ± one standard deviation "
            f"over those seeds. R@1 among the held-out pairs, zero-shot top-1 on the zero-shot sets, both in %."
            + (" Hatched: the trained row to its left after a post-hoc transform (// centring, .. standardising, "
               "xx gap shift; no training)." if any(posthoc_base(label) for track in results["tracks"].values()
                                                    for label in track["quality"]) else ""))


def quality_figure(results: dict):
    """One row of bar panels per track (its title above the row) and the caption below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tracks = list(results["tracks"].values())
    width = max(1, max(len(panels(track["quality"])) for track in tracks))
    rows = max(len(track["quality"]) for track in tracks)       # bars per panel (post-hoc rows included)
    fig = Figure(figsize=(max(3.1, 0.28 * rows + 1.0) * width, 3.9 * len(tracks) + 0.5 + 0.1 * rows), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    rows = fig.subfigures(len(tracks), 1, squeeze=False)[:, 0]
    for row, track in zip(rows, tracks):
        quality = track["quality"]
        labels = list(quality)
        chosen = panels(quality)
        row.suptitle(track["title"], fontsize=11, fontweight="bold")
        axes = row.subplots(1, width, squeeze=False)[0]
        for ax in axes[len(chosen):]:
            ax.axis("off")
        for ax, (key, title, ylabel, scale) in zip(axes, chosen):
            present = [label for label in labels if key in quality[label]]
            means = [quality[label][key]["mean"] * scale for label in present]
            stds = [quality[label][key]["std"] * scale for label in present]
            palette = dict(zip(labels, colours(labels)))
            bars = ax.bar(range(len(present)), means, yerr=stds, capsize=3, color=[palette[label] for label in present])
            for bar, label in zip(bars, present):
                if hatch(label):
                    bar.set(hatch=hatch(label), alpha=0.6, edgecolor="black", linewidth=0.3)
            ax.set_xticks(range(len(present)), present, rotation=30, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
    fig.text(0.5, 0.0, caption(results), ha="center", va="bottom", fontsize=8, wrap=True)
    fig.get_layout_engine().set(h_pad=0.1, rect=(0, 0.03, 1, 0.97))
    return fig


def plot_quality(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    quality_figure(results).savefig(path)
    return path


def pca_path(figures: Path, track: str, label: str) -> Path:
    return figures / f"pca_{track}_{label.replace(' ', '_')}.png"


TITLE_CHARS = 58      # characters per title line that fit the pair picture's width


def pca_title(track_title: str, label: str, model: str, loss: Optional[str]) -> str:
    """What the picture shows: the row of the table, its model and loss, and the track."""
    what = f"{label}: {model}" + (f", --loss {loss}" if loss else "")
    # lines short enough for the picture's width (a long track title used to run off both edges)
    return "\n".join([*textwrap.wrap(what, TITLE_CHARS), *textwrap.wrap(f"{track_title}, held-out pairs", TITLE_CHARS)])


def replot_pca(results: dict, run_dir: Path, data_dir: Path, figures: Path,
               rows_of: Callable[[str, dict], Dict[str, tuple]]) -> List[Path]:
    """Draw the pair pictures into ``figures`` again from the checkpoints a finished run left in ``RUN/runs``
    (first seed of every trained row), e.g. for a run whose figures an older version drew. ``rows_of(track
    name, track results)`` gives each trained row's (model, loss, epochs) (the benchmark's
    :func:`~openclip_align.experiments.benchmark.eval_rows`; passed in so that this module never imports the runner,
    which imports it). Rows whose checkpoint is gone are skipped with a warning; post-hoc rows are drawn
    only by the run itself (they need its training-pair embeddings)."""
    from .scoring import plot_heldout_gap

    written = []
    for name, track in results["tracks"].items():
        seed = track["plan"]["seeds"][0]
        for label, (model, loss, epochs) in rows_of(name, track).items():
            checkpoint = run_dir / "runs" / name / f"{label}-seed{seed}".replace(" ", "_") / "checkpoints" / \
                f"epoch_{epochs}.pt"
            if not checkpoint.exists():
                logging.warning("figures: no checkpoint %s; %s / %s not redrawn", checkpoint, name, label)
                continue
            path = pca_path(figures, name, label)
            written.append(plot_heldout_gap(model, checkpoint, data_dir, path,
                                            pca_title(track["title"], label, model, loss)))
    return written
