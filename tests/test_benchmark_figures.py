"""Benchmark figures: readable panels in the tables' units with the error bars explained; pair pictures
titled by model and showing the centroid gap the table reports."""
import numpy as np
import pytest

from openclip_align.experiments.benchmark_figures import pca_title, quality_figure
from openclip_align.metrics.plots import gap_pca_figure


def stat(values):
    values = list(values)
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values}


def bench_results():
    quality = {"upstream CLIP": {"centroid_gap": stat([0.40, 0.42, 0.38]), "image_to_text_R@1": stat([0.02, 0.03, 0.04]),
                                 "zeroshot_fashion_mnist_top1": stat([0.10, 0.11, 0.12])},
               "AlignCLIP": {"centroid_gap": stat([0.07, 0.06, 0.08]), "image_to_text_R@1": stat([0.01, 0.01, 0.01]),
                             "zeroshot_fashion_mnist_top1": stat([0.12, 0.13, 0.11])}}
    track = {"title": "Trained from scratch (Tiny models)", "quality": quality, "plan": {"seeds": [0, 1, 2]}}
    return {"tracks": {"scratch": track}}


def test_quality_panels_have_readable_titles_axis_labels_percent_and_a_caption():
    fig = quality_figure(bench_results())
    axes = [ax for ax in fig.get_axes() if ax.axison]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["centroid gap", "image → text R@1", "zero-shot fashion mnist top-1"]
    assert not any("_" in t for t in titles)                               # no raw metric keys
    assert [ax.get_ylabel() for ax in axes] == ["‖mean(img) − mean(txt)‖ (lower is better)",
                                                "R@1 % (higher is better)", "top-1 % (higher is better)"]
    recall = axes[1]
    heights = [bar.get_height() for bar in recall.patches]
    assert heights == pytest.approx([3.0, 1.0])                            # % as in the table, not fractions
    assert [t.get_text() for t in recall.get_xticklabels()] == ["upstream CLIP", "AlignCLIP"]
    # the error bar of upstream CLIP spans mean ± std (1 percentage point here)
    segments = [c for c in recall.collections if len(c.get_segments())][0].get_segments()
    assert segments[0][:, 1] == pytest.approx([2.0, 4.0])
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "mean over 3 seeds" in texts and "± one standard deviation" in texts
    assert [sub.get_suptitle() for sub in fig.subfigs] == ["Trained from scratch (Tiny models)"]


def test_pair_picture_puts_the_gap_on_the_x_axis_and_in_the_title():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((300, 16)) + 1.5 * np.eye(16)[0]
    text = image + 0.5 * rng.standard_normal((300, 16)) - 1.5 * np.eye(16)[0]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    gap = np.linalg.norm(unit(image).mean(0) - unit(text).mean(0))          # the table's centroid gap, by hand
    fig = gap_pca_figure(image, text, title=pca_title("Trained from scratch", "AlignCLIP", "AlignCLIP-Tiny", "imsep"),
                         gap_axis=True)
    ax = fig.get_axes()[0]
    title = ax.get_title()
    assert title.startswith("AlignCLIP: AlignCLIP-Tiny, --loss imsep\nTrained from scratch, held-out pairs")
    assert f"= {gap:.3f}" in title and ".png" not in title
    assert ax.get_xlabel().startswith("gap direction") and ax.get_ylabel().startswith("PC1 of the rest")
    centroids = ax.collections[-1].get_offsets()                           # the two x marks: image, text centroid
    assert centroids[0][0] - centroids[1][0] == pytest.approx(gap)         # apart by the gap along x
    assert centroids[0][1] == pytest.approx(centroids[1][1], abs=1e-9)     # and not at all along y
    assert ax.get_xlim() == ax.get_ylim() == pytest.approx((-1.05, 1.05))   # one scale for every model
    plain = gap_pca_figure(image, text).get_axes()[0]                      # the gap command's picture is unchanged
    assert plain.get_xlabel().startswith("PC1") and plain.get_title().startswith("Modality gap:")


def test_pair_picture_title_stays_inside_the_figure_for_the_longest_track_title():
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((50, 8)), rng.standard_normal((50, 8))
    for title in (pca_title("Pretrained towers from packages (DualCLIP-Lite0-MiniLM)", "AlignCLIP loss",
                            "DualCLIP-Lite0-MiniLM", "imsep"),
                  pca_title("Trained from scratch (Tiny models)", "upstream CLIP", "DualCLIP-Tiny",
                            "clip (OpenCLIP alone)")):
        fig = gap_pca_figure(image, text, title=title, gap_axis=True)
        fig.tight_layout()                                     # as saving the picture does
        box = fig.get_axes()[0].title.get_window_extent(fig.canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, title
