"""Benchmark report: tables per track, regression flags, README blocks rewritten from results.json only."""
import json

from openclip_align.benchmark import report
from openclip_align.benchmark.readme import update_readme


def stat(mean, std=0.01):
    return {"mean": mean, "std": std, "values": [mean]}


def track(gap, r1, rank=20.0, ratio=1.0):
    quality = {"CLIP": {"centroid_gap": stat(gap), "image_to_text_R@1": stat(r1), "effective_rank_image": stat(rank),
                        "mean_norm_image": stat(9.0), "zeroshot_digits_top1": stat(0.5)}}
    speed = {"CLIP": {"samples_per_second": 100.0, "ratio_to_upstream": 1.0, "peak_rss_mb": 1000.0,
                      "peak_cuda_mb": None, "wall_seconds_per_run": 60.0},
             "AlignCLIP": {"samples_per_second": 100.0 * ratio, "ratio_to_upstream": ratio, "peak_rss_mb": 1000.0,
                           "peak_cuda_mb": None, "wall_seconds_per_run": 60.0}}
    return {"title": "T", "plan": {"seeds": [0], "budget": {"epochs": 2, "batch_size": 64, "lr": 1e-3}},
            "quality": quality, "speed": speed, "train_seconds": 120.0, "eval_seconds": 30.0, "skipped": {}}


def results(**tracks):
    return {"created": "2026-11-24 12:00:00", "command": "openclip-align benchmark --data d",
            "machine": {"device": "cpu", "open_clip": "3.3.0"}, "data": {"train_pairs": 10, "encoder": "e"},
            "tracks": tracks, "total_seconds": 600.0, "metric_seconds_100k_pairs_768d": 1.0,
            "variant": "cpu", "compared_with": None, "flags": []}


def test_regressions_follow_direction_and_spread_per_track():
    before = results(scratch=track(0.40, 0.05), pretrained=track(0.40, 0.10))
    now = results(scratch=track(0.405, 0.05), pretrained=track(0.50, 0.02, rank=5.0, ratio=0.8))
    flags = report.regressions(now, before)
    assert any(f.startswith("pretrained / CLIP centroid_gap") for f in flags)          # gap grew beyond spread
    assert any(f.startswith("pretrained / CLIP image_to_text_R@1") for f in flags)     # recall fell
    assert any(f.startswith("pretrained / CLIP effective_rank_image") for f in flags)  # collapse
    assert any("pretrained / AlignCLIP speed ratio" in f for f in flags)
    assert not any(f.startswith("scratch") for f in flags)                              # within the spread
    assert not any("mean_norm" in f for f in flags)                                    # descriptive only


def test_a_run_from_before_tracks_is_compared_as_the_scratch_track():
    old = track(0.30, 0.05)                                  # the old layout: quality/speed at the top level
    flags = report.regressions(results(scratch=track(0.40, 0.05)), old)
    assert flags == ["scratch / CLIP centroid_gap: 0.3000 -> 0.4000 (beyond the seed spread 0.0100)"]


def test_markdown_has_each_track_and_scaled_cells():
    text = report.markdown(results(scratch=track(0.4, 0.05), pretrained=track(0.2, 0.123)))
    assert "## T" in text and text.count("Modality gap and embedding geometry") == 2
    assert "| CLIP | 0.200 ± 0.010 |" in text                  # centroid gap as is
    assert "12.3 ± 1.0" in text                              # R@1 in percent
    assert "zero-shot digits top-1 %" in text


def test_readme_blocks_are_rewritten_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark:pretrained:start -->\nOLD\n<!-- benchmark:pretrained:end -->\noutro\n")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results(scratch=track(0.4, 0.05), pretrained=track(0.2, 0.123))))
    assert update_readme(readme, path) == ["pretrained"]
    text = readme.read_text()
    assert text.startswith("intro\n<!-- benchmark:pretrained:start -->\nFrom `openclip-align benchmark --data d`")
    assert "OLD" not in text and text.endswith("<!-- benchmark:pretrained:end -->\noutro\n")
    assert "12.3 ± 1.0" in text


def test_study_grid_block_comes_from_its_results(tmp_path):
    from openclip_align.benchmark.study import summarise

    cells = [{"loss": "clip", "optimizer": "adamw", "seed": 0, "status": "ok", "image_to_text_R@1": 0.1,
              "text_to_image_R@1": 0.2, "zeroshot_top1": 0.3, "average": 0.2, "centroid_gap": 0.5},
             {"loss": "clip", "optimizer": "sgd", "seed": 0, "status": "diverged"}]
    study = {"created": "2026-11-24 13:00:00", "command": "openclip-align study", "seconds": 600.0, "cells": cells,
             "table": summarise(cells), "plan": {"regime": "pretrained", "model": "M", "extra": ["--lock-image"],
                                                 "budget": {"epochs": 2, "batch_size": 64}, "seeds": [0]}}
    readme, bench, grid = tmp_path / "README.md", tmp_path / "results.json", tmp_path / "study.json"
    readme.write_text("<!-- study:start -->\nold\n<!-- study:end -->\n")
    bench.write_text(json.dumps(results(scratch=track(0.4, 0.05))))
    grid.write_text(json.dumps(study))
    assert update_readme(readme, bench, grid) == ["study"]
    text = readme.read_text()
    assert "| clip | adamw | 10.0 | 20.0 | 30.0 | 20.0 | 0.500 |" in text
    assert "| clip | sgd | diverged |" in text and "pretrained regime: M --lock-image" in text
