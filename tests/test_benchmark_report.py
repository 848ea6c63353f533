"""Benchmark report: tables per track, regression flags, README blocks rewritten from results.json only."""
import json

from _benchmark_results import results, stat, track
from openclip_align.experiments import benchmark_report
from openclip_align.publishing.readme import update_readme


def test_regressions_follow_direction_and_spread_per_track():
    before = results(scratch=track(0.40, 0.05), pretrained=track(0.40, 0.10))
    now = results(scratch=track(0.405, 0.05), pretrained=track(0.50, 0.02, rank=5.0, ratio=0.8))
    flags = benchmark_report.regressions(now, before)
    assert any(f.startswith("pretrained / CLIP centroid_gap") for f in flags)          # gap grew beyond spread
    assert any(f.startswith("pretrained / CLIP image_to_text_R@1") for f in flags)     # recall fell
    assert any(f.startswith("pretrained / CLIP effective_rank_image") for f in flags)  # collapse
    assert any("pretrained / AlignCLIP speed ratio" in f for f in flags)
    assert not any(f.startswith("scratch") for f in flags)                              # within the spread
    assert not any("mean_norm" in f for f in flags)                                    # descriptive only


def test_a_run_from_before_tracks_is_compared_as_the_scratch_track():
    old = track(0.30, 0.05)                                  # the old layout: quality/speed at the top level
    flags = benchmark_report.regressions(results(scratch=track(0.40, 0.05)), old)
    assert flags == ["scratch / CLIP centroid_gap: 0.3000 -> 0.4000 (beyond the seed spread 0.0100)"]


def test_markdown_has_each_track_and_scaled_cells():
    text = benchmark_report.markdown(results(scratch=track(0.4, 0.05), pretrained=track(0.2, 0.123)))
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
    from openclip_align.experiments.grid_study import summarise

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


def with_corpus(res, sha="a" * 64, train=6821, heldout=1164):
    res["data"]["corpus"] = {"sha256": sha, "sha256_of": "manifest.json", "train_pairs": train,
                             "heldout_pairs": heldout}
    return res


def test_only_runs_on_the_same_corpus_are_compared():
    before = with_corpus(results(scratch=track(0.30, 0.05)), sha="b" * 64, train=6811, heldout=700)
    now = with_corpus(results(scratch=track(0.40, 0.05)))
    other = benchmark_report.compare(now, before)
    assert other["flags"] == [] and other["comparison"]["status"] == "different corpus"
    assert "6,811 training / 700 held-out" in other["comparison"]["note"]
    assert "6,821 training / 1,164 held-out" in other["comparison"]["note"]
    text = benchmark_report.markdown({**now, **other})
    assert "Not compared with the `cpu` baseline" in text and "different corpus" in text and "⚠" not in text

    unknown = benchmark_report.compare(now, results(scratch=track(0.30, 0.05)))          # a baseline without a record
    assert unknown["flags"] == [] and unknown["comparison"]["status"] == "unknown corpus"
    assert "the baseline: unknown corpus (10 training pairs" in unknown["comparison"]["note"]

    same = benchmark_report.compare(now, with_corpus(results(scratch=track(0.30, 0.05))))
    assert same["comparison"]["status"] == "compared"
    assert same["flags"] == ["scratch / CLIP centroid_gap: 0.3000 -> 0.4000 (beyond the seed spread 0.0100)"]
    assert "(same corpus; same manifest sha256 aaaaaaaaaaaa (no content hash recorded)).\nFlagged:\n" \
        "- ⚠ scratch / CLIP centroid_gap" in benchmark_report.markdown({**now, **same})
    assert benchmark_report.compare(now, None)["comparison"]["status"] == "no baseline"


def with_content(res, content, manifest_sha, version, packages, note=None):
    res = with_corpus(res, sha=manifest_sha)
    res["data"]["corpus"].update(content_sha256=content, manifest_format_version=version, packages=packages,
                                 **({"content_note": note} if note else {}))
    return res


def test_the_same_pairs_built_another_way_are_compared_and_the_build_differences_shown():
    # issue 23 changed the manifest (another sha256, format 1 -> 2) and a package moved: the pairs did not
    before = with_content(results(scratch=track(0.30, 0.05)), "c" * 64, "b" * 64, 1,
                          {"pillow": "11.0", "emoji": "2.14"}, note="rebuilt with the old code")
    now = with_content(results(scratch=track(0.40, 0.05)), "c" * 64, "a" * 64, 2, {"pillow": "11.1", "emoji": "2.14"})
    same = benchmark_report.compare(now, before)
    assert same["comparison"]["status"] == "compared" and len(same["flags"]) == 1
    assert same["comparison"]["differences"] == ["manifest sha256 bbbbbbbbbbbb -> aaaaaaaaaaaa",
                                                 "manifest format version 1 -> 2", "pillow 11.0 -> 11.1"]
    text = benchmark_report.markdown({**now, **same})
    assert "same pairs: content sha256 cccccccccccc (the baseline's: rebuilt with the old code)" in text
    assert "differ in how they were made, not in their pairs: manifest sha256" in text and "pillow 11.0 -> 11.1" in text

    other = benchmark_report.compare(with_content(results(scratch=track(0.40, 0.05)), "d" * 64, "b" * 64, 1,
                                        {"pillow": "11.0"}), before)
    # other pairs are another corpus even where the manifest's hash happens to agree
    assert other["comparison"]["status"] == "different corpus" and other["flags"] == []
    assert "content sha256 cccccccccccc" in other["comparison"]["note"]
    assert "content sha256 dddddddddddd" in other["comparison"]["note"]
    # a baseline without a content hash: its manifest hash is all there is to go by
    legacy = benchmark_report.compare(now, with_corpus(results(scratch=track(0.30, 0.05)), sha="b" * 64))
    assert legacy["comparison"]["status"] == "different corpus"
    assert "recorded no content hash" in legacy["comparison"]["note"]


def test_metrics_the_tables_do_not_show_are_never_flagged():
    before, now = results(scratch=track(0.30, 0.05)), results(scratch=track(0.30, 0.05))
    for res, value in ((before, 0.9), (now, 0.1)):          # collapsed by far, yet not in any table
        res["tracks"]["scratch"]["quality"]["CLIP"]["crossstyle_text_to_image_R@1"] = stat(value)
        res["tracks"]["scratch"]["quality"]["CLIP"]["separability"] = stat(1 - value)
    shown = benchmark_report.table_metrics(now["tracks"]["scratch"]["quality"])
    assert "crossstyle_text_to_image_R@1" not in shown and "separability" not in shown
    assert benchmark_report.regressions(now, before) == []


def test_speed_ratios_whose_round_spreads_overlap_are_not_flagged():
    before, now = results(scratch=track(0.3, 0.05)), results(scratch=track(0.3, 0.05, ratio=0.9))
    before["tracks"]["scratch"]["speed"]["AlignCLIP"].update(ratio_min=0.95, ratio_max=1.05)
    now["tracks"]["scratch"]["speed"]["AlignCLIP"].update(ratio_min=0.85, ratio_max=0.97)
    assert benchmark_report.regressions(now, before) == []
    now["tracks"]["scratch"]["speed"]["AlignCLIP"].update(ratio_max=0.93)
    assert benchmark_report.regressions(now, before) == ["scratch / AlignCLIP speed ratio: 1.000 -> 0.900"]


def test_speed_table_shows_the_spread_and_the_machine_load():
    res = results(scratch=track(0.3, 0.05, ratio=0.9))
    res["tracks"]["scratch"]["speed"]["AlignCLIP"].update(ratio_min=0.85, ratio_max=0.97)
    res["tracks"]["scratch"]["speed"]["CLIP"].update(ratio_min=1.0, ratio_max=1.0)
    res["tracks"]["scratch"]["speed_method"] = {"interleaved_rounds": 3, "samples_per_window": 1024, "min_steps": 4,
                                                "cpus": 2, "load_before": [4.1, 3.0, 2.0],
                                                "load_after": [5.0, 4.0, 3.0], "other_processes_cores": 1.2,
                                                "busy": True}
    text = benchmark_report.markdown(res)
    assert "| AlignCLIP | 90.0 | 0.900 [0.850–0.970] | 1000 | – |" in text
    assert "3 rounds" in text and "⚠ The machine was busy" in text and "4.1 / 3.0 / 2.0 before" in text


def test_a_run_from_before_corpus_records_shows_no_unchecked_flags():
    old = results(scratch=track(0.4, 0.05))
    old.update(compared_with="2026-11-23 06:55:34", flags=["scratch / CLIP crossstyle_text_to_image_R@1: 0.0126 -> 0.0088"])
    text = benchmark_report.markdown(old)
    assert "crossstyle" not in text and "predates corpus records" in text


def test_readme_block_states_the_run_time_the_results_record():
    from openclip_align.publishing import readme

    results = {"command": "openclip-align benchmark", "created": "today", "machine": {"device": "cpu"},
               "total_seconds": 2000.0,
               "tracks": {"t": {"train_seconds": 600.0, "speed_seconds": 60.0, "eval_seconds": 30.0}}}
    # 690 s = 11.5 min for the track, 600 s = 10.0 min of training, 2000 s = 33.3 min in all
    assert readme._duration(results, "t") == " This track: 11.5 min (training 10.0); the whole run: 33.3 min."
    del results["total_seconds"]
    assert readme._duration(results, "t") == ""          # results from before the record: no claim


def init_table():
    """A hand-made initialisation table: two models, the cells the report should print worked out below."""
    def row(gap, cone):
        return {"centroid_gap": stat(gap, 0.02), "alignment_score": stat(0.1234, 0.005), "cone_image": stat(cone),
                "cone_text": stat(0.95, 0.001), "effective_rank_image": stat(12.34, 0.56),
                "effective_rank_text": stat(3.0, 0.04), "pairs": 64}
    return {"models": {"DualCLIP-Tiny": row(0.8123, 0.9), "SharedCLIP-Tiny": row(0.2, 0.5)}, "seeds": [0, 1, 2, 3, 4],
            "seconds": 41.6, "note": "ViT-B-16 left out on CPU."}


def test_markdown_has_the_initialisation_section_after_the_tracks():
    res = results(scratch=track(0.4, 0.05))
    res["initialisation"] = init_table()
    text = benchmark_report.markdown(res)
    assert ("| DualCLIP-Tiny | 64 | 0.812 ± 0.020 | 0.123 ± 0.005 | 0.900 ± 0.010 | 0.950 ± 0.001 | 12.3 ± 0.6 | "
            "3.0 ± 0.0 |") in text
    assert "| SharedCLIP-Tiny | 64 | 0.200 ± 0.020 | 0.123 ± 0.005 | 0.500 ± 0.010 |" in text
    assert "seeds [0, 1, 2, 3, 4]" in text and "Measured in 42 s." in text and "ViT-B-16 left out on CPU." in text
    assert text.index("## T") < text.index("## At initialisation") < text.index("## Regressions")


def test_results_without_the_initialisation_table_still_render():
    text = benchmark_report.markdown(results(scratch=track(0.4, 0.05)))       # a results.json from before the table
    assert "At initialisation" not in text and "| CLIP | 0.400 ± 0.010 |" in text


README_WITH_INIT = ("intro\n<!-- benchmark:scratch:start -->\nOLD\n<!-- benchmark:scratch:end -->\nmiddle\n"
                    "<!-- benchmark:initialisation:start -->\n<!-- benchmark:initialisation:end -->\noutro\n")


def test_readme_initialisation_block_is_filled_between_its_markers(tmp_path):
    readme, path = tmp_path / "README.md", tmp_path / "results.json"
    readme.write_text(README_WITH_INIT)
    res = results(scratch=track(0.4, 0.05))
    res["initialisation"] = init_table()
    path.write_text(json.dumps(res))
    assert update_readme(readme, path) == ["scratch", "initialisation"]
    text = readme.read_text()
    start = text.index("<!-- benchmark:initialisation:start -->\n") + len("<!-- benchmark:initialisation:start -->\n")
    block = text[start:text.index("<!-- benchmark:initialisation:end -->")]
    assert block.startswith("From `openclip-align benchmark --data d`, 2026-11-24 12:00:00 (cpu).\n")
    assert "| DualCLIP-Tiny | 64 | 0.812 ± 0.020 |" in block and "| SharedCLIP-Tiny | 64 |" in block
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("<!-- benchmark:initialisation:end "
                                                                                "-->\noutro\n")


def test_readme_initialisation_block_is_left_alone_without_a_measured_table(tmp_path):
    readme, path = tmp_path / "README.md", tmp_path / "results.json"
    for init in (None, {"skipped": "RuntimeError: out of memory"}):
        readme.write_text(README_WITH_INIT)
        res = results(scratch=track(0.4, 0.05))
        if init is not None:
            res["initialisation"] = init
        path.write_text(json.dumps(res))
        assert update_readme(readme, path) == ["scratch"]
        assert "<!-- benchmark:initialisation:start -->\n<!-- benchmark:initialisation:end -->" in readme.read_text()


def test_the_same_pairs_with_caption_embeddings_of_another_encoder_are_not_compared():
    before = with_content(results(scratch=track(0.30, 0.05)), "c" * 64, "b" * 64, 2, {})
    now = with_content(results(scratch=track(0.40, 0.05)), "c" * 64, "b" * 64, 2, {})
    before["data"]["encoder"], now["data"]["encoder"] = "all-mpnet-base-v2", "all-MiniLM-L6-v2"
    other = benchmark_report.compare(now, before)
    assert other["comparison"]["status"] == "different corpus" and other["flags"] == []
    assert "from all-mpnet-base-v2, this run's from all-MiniLM-L6-v2" in other["comparison"]["note"]
