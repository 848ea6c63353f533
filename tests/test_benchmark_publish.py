"""Runs write to untracked folders; publishing one into the committed copy is an explicit step that also
works for a run an older version made (no corpus record)."""
import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from _benchmark_results import results, track
from openclip_align.publishing import committed_copy

REPO = Path(__file__).resolve().parent.parent
README = ("intro\n<!-- benchmark:scratch:start -->\nOLD\n<!-- benchmark:scratch:end -->\n"
          "<!-- study:start -->\nOLD GRID\n<!-- study:end -->\n")


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def old_run(tmp_path: Path, **changes) -> Path:
    """A run folder as the version before corpus records left it."""
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    res = results(scratch=track(0.4, 0.05))
    res.update(compared_with="2026-11-23 06:55:34", flags=["scratch / CLIP crossstyle_text_to_image_R@1: 1 -> 0"],
               **changes)
    (run / "results.json").write_text(json.dumps(res))
    (run / "results.md").write_text("old report")
    (run / "figures" / "pca_scratch_CLIP.png").write_bytes(b"\x89PNG old picture")
    return run


def test_publishing_an_old_run_fills_the_committed_copy_and_readme_and_leaves_the_run_alone(tmp_path):
    run = old_run(tmp_path)
    before = digest(run)
    committed, readme = tmp_path / "benchmark", tmp_path / "README.md"
    readme.write_text(README)
    assert committed_copy.main(["--benchmark", str(run), "--to-benchmark", str(committed), "--readme", str(readme)]) == 0
    assert digest(run) == before
    published = json.loads((committed / "results.json").read_text())
    assert published == json.loads((run / "results.json").read_text())
    assert json.loads((committed / "baselines" / "cpu.json").read_text()) == published
    assert (committed / "figures" / "pca_scratch_CLIP.png").read_bytes() == b"\x89PNG old picture"
    assert (committed / "figures" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    report = (committed / "results.md").read_text()
    assert "predates corpus records" in report and "crossstyle" not in report
    text = readme.read_text()
    assert "OLD\n" not in text and "From `openclip-align benchmark --data d`" in text and "OLD GRID" in text


def test_corpus_record_added_at_publish_only_when_the_pair_count_matches(tmp_path):
    run = old_run(tmp_path)                               # the run read 10 training pairs
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = ["filepath\ttitle"] + [f"{corpus}/{i}.png\tc {i}" for i in range(10)]
    for i in range(10):
        (corpus / f"{i}.png").write_bytes(b"picture %d" % i)
    (corpus / "train.csv").write_text("\n".join(rows) + "\n")
    (corpus / "heldout.csv").write_text("\n".join(rows[:4]) + "\n")
    committed = tmp_path / "benchmark"
    committed_copy.main(["--benchmark", str(run), "--to-benchmark", str(committed), "--readme", str(tmp_path / "none.md"),
                  "--corpus", str(corpus)])
    record = json.loads((committed / "results.json").read_text())["data"]["corpus"]
    assert record["train_pairs"] == 10 and record["heldout_pairs"] == 3 and record["recorded_at"].startswith("publish")
    assert record["content_pairs"] == {"heldout": 3, "train": 10}          # no manifest: hashed from the files
    (corpus / "train.csv").write_text("\n".join(rows[:6]) + "\n")
    with pytest.raises(SystemExit, match="holds 5 training pairs but the run read 10"):
        committed_copy.main(["--benchmark", str(run), "--to-benchmark", str(committed), "--corpus", str(corpus)])


def test_other_variants_go_to_their_own_folder_and_leave_readme_alone(tmp_path):
    run = old_run(tmp_path, variant="cpu-quick")
    committed, readme = tmp_path / "benchmark", tmp_path / "README.md"
    readme.write_text(README)
    committed_copy.main(["--benchmark", str(run), "--to-benchmark", str(committed), "--readme", str(readme)])
    assert (committed / "cpu-quick" / "results.md").exists() and (committed / "baselines" / "cpu-quick.json").exists()
    assert not (committed / "results.json").exists() and readme.read_text() == README


def test_study_is_published_the_same_way(tmp_path):
    from openclip_align.experiments.grid_study import summarise

    cells = [{"loss": "clip", "optimizer": "adamw", "seed": 0, "status": "ok", "image_to_text_R@1": 0.1,
              "text_to_image_R@1": 0.2, "zeroshot_top1": 0.3, "average": 0.2, "centroid_gap": 0.5}]
    study = {"created": "2026-11-24 13:00:00", "command": "openclip-align study", "seconds": 60.0, "cells": cells,
             "table": summarise(cells), "plan": {"regime": "pretrained", "model": "M", "extra": [], "lr": {},
                                                 "losses": ["clip"], "optimizers": ["adamw"],
                                                 "budget": {"epochs": 1, "batch_size": 64}, "seeds": [0]}}
    run = tmp_path / "study-run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(study))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    committed_copy.main(["--study", str(run), "--to-study", str(tmp_path / "study"), "--readme", str(readme)])
    assert (tmp_path / "study" / "study.png").exists() and "| clip | adamw | 10.0 |" in readme.read_text()
    assert "\nOLD\n" in readme.read_text()                 # the benchmark blocks are not touched
    with pytest.raises(SystemExit, match="nothing to publish"):
        committed_copy.main(["--study", str(tmp_path / "missing")])


def test_default_outputs_are_untracked():
    from openclip_align.commands import benchmark, study

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    benchmark.register(sub)
    study.register(sub)
    outs = [parser.parse_args([name]).out for name in ("benchmark", "study")]
    assert outs == [Path("runs/benchmark"), Path("runs/study")]
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for out in outs:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=REPO)
        assert ignored.returncode == 0, f"{out} is not gitignored"


def test_pair_pictures_are_redrawn_from_a_finished_runs_checkpoints(tmp_path, monkeypatch):
    import open_clip
    import torch

    from conftest import write_digits_corpus
    from openclip_align.metrics import plots

    corpus = write_digits_corpus(tmp_path / "corpus", n_train=4, n_heldout=24)
    res = results(scratch=track(0.4, 0.05))
    scratch = res["tracks"]["scratch"]
    scratch["plan"].update(seeds=[3], rows={"upstream CLIP": {"model": "local-dir:/gone", "loss": "clip"},
                                            "AlignCLIP": {"model": "AlignCLIP-Tiny", "loss": "imsep"}})
    scratch["quality"] = {label: scratch["quality"]["CLIP"] for label in ("upstream CLIP", "AlignCLIP", "CLIP-Refine")}
    run = tmp_path / "run"
    weights = {"state_dict": open_clip.create_model("DualCLIP-Tiny").state_dict()}
    for name, epoch in (("upstream_CLIP-seed3", 2), ("CLIP-Refine-seed3", 1)):      # AlignCLIP's is gone
        (run / "runs" / "scratch" / name / "checkpoints").mkdir(parents=True)
        torch.save(weights, run / "runs" / "scratch" / name / "checkpoints" / f"epoch_{epoch}.pt")
    (run / "results.json").write_text(json.dumps(res))
    drawn = []
    real = plots.plot_gap_pca
    monkeypatch.setattr(plots, "plot_gap_pca", lambda *a, **k: drawn.append(k) or real(*a, **k))
    committed = tmp_path / "benchmark"
    committed_copy.main(["--benchmark", str(run), "--to-benchmark", str(committed), "--readme", str(tmp_path / "no.md"),
                  "--redraw-pca", str(corpus)])
    assert [d["title"].split("\n")[0] for d in drawn] == ["upstream CLIP: DualCLIP-Tiny, --loss clip (OpenCLIP alone)",
                                                         "CLIP-Refine: DualCLIP-Tiny, --loss refine"]
    assert all(d["gap_axis"] for d in drawn)
    assert sorted(p.name for p in (committed / "figures").glob("pca_*")) == [
        "pca_scratch_CLIP-Refine.png", "pca_scratch_upstream_CLIP.png"]


def test_a_published_run_gets_the_content_hash_of_a_rebuild_only_when_its_manifest_is_the_recorded_one(tmp_path):
    """A baseline from before content hashes: a rebuild with that run's code whose manifest hashes to what the run
    recorded is the same build, so its pairs' hash is the run's; any other manifest is refused."""
    from openclip_align.experiments.corpus_identity import manifest_sha256
    from openclip_align.data.content import content_of_files

    corpus = tmp_path / "rebuilt"
    corpus.mkdir()
    (corpus / "0.png").write_bytes(b"picture")
    (corpus / "train.csv").write_text(f"filepath\ttitle\n{corpus}/0.png\ta cat\n")
    manifest = {"format_version": 1, "packages": {"pillow": "11.0"}, "counts": {"train": 1}}
    (corpus / "manifest.json").write_text(json.dumps(manifest, indent=3))         # formatting does not count
    committed = tmp_path / "benchmark"
    (committed / "baselines").mkdir(parents=True)
    run = results(scratch=track(0.4, 0.05))
    run["data"]["corpus"] = {"sha256": manifest_sha256(manifest), "sha256_of": "manifest.json", "train_pairs": 1,
                             "heldout_pairs": None}
    for path in (committed / "results.json", committed / "baselines" / "cpu.json"):
        path.write_text(json.dumps(run))
    assert committed_copy.main(["--add-content", str(corpus), "--note", "rebuilt with commit abc", "--to-benchmark",
                         str(committed)]) == 0
    for path in (committed / "results.json", committed / "baselines" / "cpu.json"):
        record = json.loads(path.read_text())["data"]["corpus"]
        assert record["content_sha256"] == content_of_files(corpus)["sha256"]
        assert record["content_note"] == "rebuilt with commit abc" and record["manifest_format_version"] == 1
        assert record["packages"] == {"pillow": "11.0"} and record["sha256"] == manifest_sha256(manifest)

    (corpus / "manifest.json").write_text(json.dumps({**manifest, "packages": {"pillow": "11.1"}}))
    with pytest.raises(SystemExit, match="not the build the run used"):
        committed_copy.main(["--add-content", str(corpus), "--note", "x", "--to-benchmark", str(committed)])
