"""README's prose numbers come from results files through the generator (openclip_align/publishing/reading.py,
readme.py): hand-made results give hand-written sentences, and the committed README regenerates unchanged."""
import json
import shutil
from pathlib import Path

from openclip_align.publishing import reading, readme

ROOT = Path(__file__).resolve().parent.parent


def stat(mean, std=0.01):
    return {"mean": mean, "std": std, "values": [mean]}


def test_spread_words_follow_the_numbers():
    assert reading.spread_word(stat(0.10, 0.02), stat(0.11, 0.01)) == "within one seed spread"
    assert reading.spread_word(stat(0.10, 0.02), stat(0.16, 0.01)) == "3.0x the seed spread"
    assert reading.spread_word(stat(0.10, 0.0), stat(0.16, 0.0)) == "beyond the seed spread"


def scratch_results(created="2026-12-01 10:00:00"):
    quality = {
        "upstream CLIP": {"centroid_gap": stat(0.40), "image_to_text_R@1": stat(0.026, 0.006),
                          "top2_variance_share_image": stat(0.47), "effective_rank_image": stat(28.5)},
        "AlignCLIP": {"centroid_gap": stat(0.07), "image_to_text_R@1": stat(0.009, 0.003),
                      "top2_variance_share_image": stat(0.69), "effective_rank_image": stat(26.1)},
    }
    return {"created": created, "variant": "cpu", "tracks": {"scratch": {"quality": quality, "plan": {}}}}


def test_the_scratch_paragraph_reads_every_number_from_the_results():
    line = reading.scratch_line(scratch_results())
    # 2.6 -> 0.9 % is 0.017 apart, 2.8x the larger seed std 0.006
    assert line.startswith("**From scratch**, AlignCLIP moves the gap 0.40 -> 0.07 and image->text R@1 2.6 -> 0.9 % "
                           "(2.8x the seed spread); 69 % of its image variance lies in two principal components "
                           "against 47 % for upstream CLIP, at an effective rank of 26.1 against 28.5.")


def test_rows_the_published_run_lacks_come_from_the_kept_run_named_by_its_link():
    published = scratch_results()
    kept = scratch_results("2026-12-02 10:00:00")
    kept["initialisation"] = {"models": {"DualCLIP-Tiny": {"centroid_gap": stat(1.196), "cone_image": stat(0.977)},
                                         "SharedCLIP-Tiny": {"centroid_gap": stat(1.141), "cone_image": stat(0.956)}}}
    kept["tracks"]["scratch"]["speed_method"] = {"busy": True}
    lines = reading.reading_lines(published, kept, "benchmark/kept/results.md")
    text = "\n".join(lines)
    assert "the run of 2026-12-02 that has them is kept in [benchmark/kept/results.md](benchmark/kept/results.md) " \
           "(its trained rows repeat the published numbers; its speed windows ran on a busy machine" in text
    assert "(`DualCLIP-Tiny`: centroid gap 1.20, image cone 0.98)" in text and "(`SharedCLIP-Tiny`: 1.14)" in text
    # with the rows in the published run itself, no kept run is mentioned
    published["initialisation"] = kept["initialisation"]
    assert "kept in" not in "\n".join(reading.reading_lines(published, kept, "x"))


def test_the_kept_run_is_the_newest_later_run_of_the_same_variant(tmp_path):
    for folder, created, variant in (("old", "2026-11-01 00:00:00", "cpu"), ("gpu", "2026-12-03 00:00:00", "gpu"),
                                     ("a", "2026-12-02 00:00:00", "cpu"), ("b", "2026-12-01 00:00:00", "cpu")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({"created": created, "variant": variant}))
    published = {"created": "2026-11-24 00:00:00", "variant": "cpu"}
    assert readme.kept_run(tmp_path / "results.json", published) == tmp_path / "a" / "results.json"


def test_machine_text_says_only_what_was_recorded():
    assert readme.machine_text({"device": "cpu"}) == "cpu"
    assert readme.machine_text({"device": "cpu", "cpus": 16, "load_at_start": [0.5, 1, 1],
                                "load_at_end": [2.25, 1, 1]}) == \
        "cpu, 16 CPU cores, 1-minute load average 0.5 at the start, 2.2 at the end"
    assert readme.machine_text(None) == ""


def test_the_committed_readme_regenerates_unchanged_from_the_committed_results(tmp_path):
    """Every generated block of README.md, rewritten from the committed results files, gives README.md again."""
    from openclip_align.publishing.readme import update_readme, update_temperature_block

    for folder in ("benchmark", "study"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    copy = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", copy)
    done = update_readme(copy, tmp_path / "benchmark" / "results.json", tmp_path / "study" / "results.json")
    assert {"reading", "speed-summary", "study"} <= set(done)
    assert update_temperature_block(copy, tmp_path / "study" / "temperature" / "results.json")
    assert copy.read_text() == (ROOT / "README.md").read_text()


def test_notes_claims_name_what_moved_beyond_the_seed_spread():
    from openclip_align.publishing.claims import _within, lr_text

    assert _within([("image_to_text_R@1", stat(0.091, 0.007), stat(0.093, 0.01))]) == "within one seed spread"
    # 21.5 -> 20.9 % with stds 0.4 and 0.3 points: 0.6 / 0.4 = 1.5x
    assert _within([("zeroshot_fashion_mnist_top1", stat(0.215, 0.004), stat(0.209, 0.003))]) == \
        "within one seed spread but Fashion-MNIST 1.5x the seed spread"
    assert lr_text(1e-6) == "1e-6" and lr_text(0.0001) == "0.0001"


def test_the_committed_notes_regenerate_unchanged_from_the_results_they_quote(tmp_path):
    from openclip_align.publishing.claims import update_notes

    (tmp_path / "docs").mkdir()
    for folder in ("benchmark", "study"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    copy = tmp_path / "docs" / "notes.md"
    shutil.copyfile(ROOT / "docs" / "notes.md", copy)
    assert update_notes(copy, tmp_path / "benchmark" / "results.json",
                        tmp_path / "study" / "temperature" / "results.json")
    assert copy.read_text() == (ROOT / "docs" / "notes.md").read_text()


def _refine_rows(lr, raw, own, one):
    return [{"kind": "refine", "lr": lr, "hycd_logit_scale": scale, "centroid_gap": gap, "zeroshot_top1": 0.25}
            for scale, gap in ((None, raw), (15.0, own), (1.0, one))]


def test_the_explanation_verdict_follows_the_order_of_the_measured_gaps():
    """Our explanation predicts raw-feature HyCD (sharpest) > own scale > times 1 for the gap; hand-made rows."""
    from openclip_align.publishing.claims import explanation_bullet

    start, recipe = {"centroid_gap": 0.2, "zeroshot_top1": 0.3}, {"lr": 1e-6, "batch_size": 100}

    def bullet(*higher):
        rows = _refine_rows(1e-6, 0.201, 0.2, 0.199) + [r for h in higher for r in _refine_rows(1e-4, *h)]
        return explanation_bullet({"rows": rows, "plan": {"seed": 0}, "start": {"logit_scale": 15.0}}, start, recipe,
                                  1000)

    assert "is untested.*" in bullet() and "none of the three moves the gap by 0.01 or more" in bullet()
    assert "supported in direction" in bullet((0.4, 0.25, 0.1))
    # the published shape: raw widens most, own scale narrows, times 1 holds (moves by less than 0.01)
    part = bullet((0.37, 0.13, 0.205))
    assert "supported in part" in part and "times 1 leaves it at 0.205" in part and "narrows it to 0.130" in part
    assert "not supported" in bullet((0.21, 0.3, 0.1))
