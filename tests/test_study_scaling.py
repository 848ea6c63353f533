"""`openclip-align study --train-fractions`: the data-scaling study (issue 31, item 2)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from openclip_align.experiments import grid_study, scaling_study
from openclip_align.experiments.trainer_processes import Budget, TrainResult
from openclip_align.publishing import committed_copy
from openclip_align.cli import main


# --- subsets -------------------------------------------------------------------------------------------------

def test_subset_sizes_are_floor_of_the_fraction_and_all_for_one():
    # 10 pairs: 10/4 = 2.5 -> 2, 10/2 = 5; the default corpus's 6821: 1705.25 -> 1705, 3410.5 -> 3410
    assert {f: len(r) for f, r in scaling_study.nested_subsets(10, [0.25, 0.5, 1]).items()} == {0.25: 2, 0.5: 5, 1.0: 10}
    assert {f: len(r) for f, r in scaling_study.nested_subsets(6821, [1, 0.5, 0.25]).items()} == \
        {0.25: 1705, 0.5: 3410, 1.0: 6821}


def test_subsets_are_nested_distinct_rows_and_the_same_every_time():
    first = scaling_study.nested_subsets(6821, [0.25, 0.5, 1])
    again = scaling_study.nested_subsets(6821, [1, 0.25, 0.5])
    for f in (0.25, 0.5, 1.0):
        np.testing.assert_array_equal(first[f], again[f])
        assert len(set(first[f].tolist())) == len(first[f]) and first[f].min() >= 0 and first[f].max() < 6821
    assert set(first[0.25].tolist()) <= set(first[0.5].tolist()) <= set(first[1.0].tolist())
    assert first[1.0].tolist() == list(range(6821))
    # a fixed seed of its own: another subset seed draws other pairs (the training seeds are never involved)
    other = scaling_study.nested_subsets(6821, [0.25], seed=scaling_study.SUBSET_SEED + 1)
    assert set(other[0.25].tolist()) != set(first[0.25].tolist())


@pytest.mark.parametrize("bad", [[], [0], [1.5], [0.5, 0.5], [-0.25]])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError):
        scaling_study.check_fractions(bad)


def test_a_subset_csv_keeps_its_rows_renumbered_with_their_own_embeddings(tmp_path):
    rows = ["filepath\ttitle\tindex"] + [f"/img/{i}.png\tcaption {i}\t{i + 100}" for i in range(6)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    emb = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.save(tmp_path / "train.emb.npy", emb)
    (tmp_path / "train.emb.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": 4, "n": 6}))
    csv = scaling_study.write_subset(tmp_path, np.array([1, 4]), tmp_path / "sub", "train-0.5")
    assert csv.read_text().splitlines() == ["filepath\ttitle\tindex", "/img/1.png\tcaption 1\t0",
                                            "/img/4.png\tcaption 4\t1"]
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "train-0.5.emb.npy"), [[4, 5, 6, 7], [16, 17, 18, 19]])
    meta = json.loads((tmp_path / "sub" / "train-0.5.emb.json").read_text())
    assert meta["n"] == 2 and meta["dim"] == 4 and meta["model"] == "all-MiniLM-L6-v2"


# --- the plan --------------------------------------------------------------------------------------------------

def test_the_plan_trains_the_benchmark_scratch_rows_with_their_flags(tmp_path):
    plan = scaling_study.ScalingPlan()
    track = plan.track(tmp_path)
    cells = plan.cells(track)
    assert len(cells) == 3 * 3 * 3
    assert [(c["fraction"], c["seed"], c["row"]) for c in cells[:4]] == [
        (0.25, 0, "upstream CLIP"), (0.25, 0, "SharedCLIP"), (0.25, 0, "AlignCLIP"), (0.25, 1, "upstream CLIP")]
    assert [c["fraction"] for c in cells] == sorted(c["fraction"] for c in cells)     # smallest fraction first
    by_row = {c["row"]: c for c in cells}
    upstream, shared, align = by_row["upstream CLIP"], by_row["SharedCLIP"], by_row["AlignCLIP"]
    assert upstream["spec"].upstream and upstream["spec"].model.startswith("local-dir:")
    assert upstream["spec"].extra == [] and upstream["eval_model"] == "DualCLIP-Tiny"
    assert not shared["spec"].upstream and shared["spec"].loss == "clip" and shared["spec"].model == "SharedCLIP-Tiny"
    assert shared["spec"].extra == []
    assert align["spec"].loss == "imsep" and align["spec"].model == "AlignCLIP-Tiny"
    assert align["spec"].extra == ["--semantic-source", "precomputed"]
    # the benchmark's scratch budget on a CPU: 3 epochs, batch 64, lr 1e-3, warm-up 20, weight decay 0.1
    b = track.budget
    assert (b.epochs, b.batch_size, b.lr, b.warmup, b.wd, b.device, b.precision) == (3, 64, 1e-3, 20, 0.1, "cpu", "fp32")


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """grid_study.train and grid_study.evaluate_model replaced: every trainer run recorded; R@1 grows with the pairs read."""
    calls = []

    def fake_train(spec, train_data, budget, seed, logs, progress=False, name=None, **kwargs):
        pairs = sum(1 for _ in open(train_data)) - 1
        calls.append({"label": spec.label, "train_data": train_data, "pairs": pairs, "seed": seed, "name": name,
                      "budget": budget})
        ckpt = logs / name / "epoch_3.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        import torch
        torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
        return TrainResult(spec.label, seed, ckpt, 100.0, 1.0, None, 1.0, logs)

    def fake_evaluate(model, ckpt, data_dir, device="cpu", **kwargs):
        pairs = next(c["pairs"] for c in calls if c["name"] == ckpt.parent.name)
        return {"centroid_gap": 0.5, "image_to_text_R@1": pairs / 1000, "text_to_image_R@1": pairs / 1000,
                "zeroshot_a_top1": 0.3}

    monkeypatch.setattr(grid_study, "train", fake_train)
    monkeypatch.setattr(grid_study, "evaluate_model", fake_evaluate)
    data = tmp_path / "data"
    data.mkdir()
    rows = ["filepath\ttitle\tindex"] + [f"/img/{i}.png\tcaption {i}\t{i}" for i in range(200)]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    np.save(data / "train.emb.npy", np.eye(200, 8, dtype=np.float32))
    (data / "heldout.csv").write_text("filepath\ttitle\n")
    # a built corpus's manifest carries its content hash (the images named above do not exist to hash)
    (data / "manifest.json").write_text(json.dumps({"content": {"sha256": "c0ffee", "pairs": 200}}))
    return calls, data


def test_every_run_trains_on_its_fraction_and_is_scored_on_the_corpus(fake_runs, tmp_path):
    calls, data = fake_runs
    plan = scaling_study.ScalingPlan(fractions=[0.5, 1], seeds=[0, 1])
    results = scaling_study.run_scaling_study(data, tmp_path / "out", plan, command="test")
    assert len(calls) == 2 * 2 * 3 and results["complete"]
    assert [c["pairs"] for c in calls] == [100] * 6 + [200] * 6
    assert {c["train_data"] for c in calls[6:]} == {str(data / "train.csv")}          # all: the corpus's own csv
    assert {c["train_data"] for c in calls[:6]} == {str(tmp_path / "out" / "subsets" / "train-0.5.csv")}
    assert [c["seed"] for c in calls[:6]] == [0, 0, 0, 1, 1, 1]
    assert len({c["name"] for c in calls}) == 12                                       # one folder per run
    assert results["plan"]["pairs"] == {"0.5": 100, "1": 200}
    assert results["machine"]["cpus"] and len(results["machine"]["load_per_run"]) == 12
    assert results["corpus"]["content_sha256"] == "c0ffee"
    assert (tmp_path / "out" / "results.md").exists() and (tmp_path / "out" / "scaling.png").exists()


def test_a_rerun_keeps_the_runs_already_done(fake_runs, tmp_path):
    calls, data = fake_runs
    plan = scaling_study.ScalingPlan(fractions=[0.5, 1], seeds=[0])
    scaling_study.run_scaling_study(data, tmp_path / "out", plan)
    first = len(calls)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    saved["cells"] = saved["cells"][:2]                 # as if stopped after two runs
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    results = scaling_study.run_scaling_study(data, tmp_path / "out", plan)
    assert len(calls) - first == 4 and results["complete"]
    # both sessions' records are kept: the first as saved (six runs started), the second with its four runs
    earlier = results["machine"]["earlier_sessions"]
    assert len(earlier) == 1 and len(earlier[0]["load_per_run"]) == 6 and len(results["machine"]["load_per_run"]) == 4
    assert results["seconds"] >= saved["seconds"]
    assert " in 2 sessions." in scaling_study.conditions_line(results)


def test_fractions_smaller_than_a_batch_are_refused(fake_runs, tmp_path):
    _, data = fake_runs
    with pytest.raises(ValueError, match="fewer pairs than one batch"):
        scaling_study.run_scaling_study(data, tmp_path / "out", scaling_study.ScalingPlan(fractions=[0.25, 1]))   # 50 < 64


# --- results.md and README from a hand-made run ------------------------------------------------------------

def hand_made_results(complete=True):
    """Two fractions (100 and 200 pairs), two seeds. R@1 (both directions equal) and zero-shot by hand:
    at 100 pairs CLIP 0.10 / 0.12, AlignCLIP 0.06 / 0.06 (AlignCLIP - CLIP: -0.04, -0.06: mean -0.05, std 0.0141);
    at 200 pairs CLIP 0.20 / 0.22, AlignCLIP 0.19 / 0.21 (-0.01, -0.01: mean -0.01, std 0)."""
    values = {(0.5, "upstream CLIP"): (0.10, 0.12), (0.5, "SharedCLIP"): (0.08, 0.08), (0.5, "AlignCLIP"): (0.06, 0.06),
              (1.0, "upstream CLIP"): (0.20, 0.22), (1.0, "SharedCLIP"): (0.15, 0.15), (1.0, "AlignCLIP"): (0.19, 0.21)}
    cells = []
    for (f, row), per_seed in values.items():
        for seed, v in enumerate(per_seed):
            cells.append({"fraction": f, "pairs": int(200 * f), "seed": seed, "row": row, "status": "ok",
                          "image_to_text_R@1": v, "text_to_image_R@1": v, "retrieval_R@1": v, "zeroshot_top1": 0.5,
                          "centroid_gap": 0.4 if row == "upstream CLIP" else 0.3, "average": v})
    if not complete:
        cells = cells[:-1]
    plan = {"fractions": [0.5, 1.0], "seeds": [0, 1], "subset_seed": 7, "rows": list(scaling_study.ROWS),
            "pairs": {"0.5": 100, "1": 200}, "budget": Budget(epochs=3).__dict__, "flags": {}, "data": "data/default"}
    distance = scaling_study.distances(cells, plan["fractions"])
    results = {"created": "2026-12-05 04:00:00", "command": "openclip-align study --train-fractions 0.5 1", "plan": plan,
               "machine": {"cpus": 2, "started": "2026-12-05 03:00:00 UTC", "ended": "2026-12-05 04:00:00 UTC",
                           "load_per_run": [[3.0, 2, 2], [5.5, 4, 3]]},
               "cells": cells, "table": scaling_study.summarise(cells, plan["fractions"], plan["rows"]),
               "distance": distance, "trend": [scaling_study.trend(distance, k) for k in scaling_study.METRICS], "seconds": 3600}
    results["complete"] = scaling_study.is_complete(results)
    return results


def test_the_table_rows_are_mean_and_std_over_seeds_with_the_distance_by_seed():
    lines = scaling_study.table_lines(hand_made_results())
    assert "| 100 (1/2) | upstream CLIP | 2 of 2 | 11.0 ± 1.4 | 50.0 ± 0.0 | 0.400 ± 0.000 |" in lines
    assert "| 200 (all) | AlignCLIP | 2 of 2 | 20.0 ± 1.4 | 50.0 ± 0.0 | 0.300 ± 0.000 |" in lines
    assert "| 100 (1/2) | AlignCLIP − CLIP, by seed | 2 | -5.0 ± 1.4 | 0.0 ± 0.0 | -0.100 ± 0.000 |" in lines
    assert "| 200 (all) | AlignCLIP − CLIP, by seed | 2 | -1.0 ± 0.0 | 0.0 ± 0.0 | -0.100 ± 0.000 |" in lines


def test_the_trend_is_measured_against_the_seed_spread():
    trends = {t["metric"]: t for t in hand_made_results()["trend"]}
    r1 = trends["retrieval_R@1"]
    # -0.05 -> -0.01: a change of +0.04 against a spread of sqrt(0.0141^2 + 0^2) = 0.0141: the distance shrinks
    assert math.isclose(r1["change"], 0.04) and math.isclose(r1["spread"], math.sqrt(0.0002))
    assert r1["verdict"] == "shrinks" and (r1["from_pairs"], r1["to_pairs"]) == (100, 200)
    assert trends["zeroshot_top1"]["verdict"] == "holds"            # 0 -> 0
    assert scaling_study.trend([{"fraction": 1, "seeds": 2, "pairs": 9, "retrieval_R@1": {"mean": 0, "std": 0}}],
                         "retrieval_R@1") is None                  # one fraction: no trend
    flip = [{"fraction": 0.5, "seeds": 3, "pairs": 1, "k": {"mean": -0.03, "std": 0.01}},
            {"fraction": 1, "seeds": 3, "pairs": 2, "k": {"mean": 0.05, "std": 0.01}}]
    grow = [flip[0], {"fraction": 1, "seeds": 3, "pairs": 2, "k": {"mean": -0.08, "std": 0.01}}]
    assert scaling_study.trend(flip, "k")["verdict"] == "reverses" and scaling_study.trend(grow, "k")["verdict"] == "grows"


def test_publish_writes_study_scaling_and_readme_block_from_results_json(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(hand_made_results()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:scaling:start -->\nold\n<!-- study:scaling:end -->\nafter\n")
    assert committed_copy.main(["--scaling-study", str(run), "--to-scaling-study", str(tmp_path / "pub"),
                         "--readme", str(readme)]) == 0
    assert json.loads((tmp_path / "pub" / "results.json").read_text()) == hand_made_results() | {
        "created": "2026-12-05 04:00:00"}
    assert (tmp_path / "pub" / "scaling.png").exists() and "| 200 (all) | SharedCLIP |" in \
        (tmp_path / "pub" / "results.md").read_text()
    text = readme.read_text()
    assert text.startswith("intro\n<!-- study:scaling:start -->\nFrom `openclip-align study --train-fractions 0.5 1`")
    assert text.endswith("<!-- study:scaling:end -->\nafter\n") and "\nold\n" not in text
    assert "on 2 CPU cores, 1-minute load average 3.0 to 5.5" in text
    assert "goes from -5.0 points at 100 pairs to -1.0 points at 200 (a change of +4.0 points, seed spread ±1.4 " \
           "points): the distance shrinks (by more than the seed spread)." in text
    # the CC12M sentence: a 2x range here; 12.4M pairs are 62,000x the 200 pairs of the largest set
    assert "over a 2x range of training pairs (100 to 200) with 2 seeds" in text and "62,000x the largest set" in text


def test_an_unfinished_study_is_not_published(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    results = hand_made_results(complete=False)
    assert not results["complete"]
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="did not finish every run"):
        committed_copy.main(["--scaling-study", str(run), "--to-scaling-study", str(tmp_path / "pub"),
                      "--readme", str(tmp_path / "README.md")])
    assert not (tmp_path / "pub").exists()


# --- the command ------------------------------------------------------------------------------------------------

def test_the_command_refuses_grid_and_temperature_flags(tmp_path):
    for extra, message in [(["--losses", "clip"], "--losses"), (["--epochs", "1"], "--epochs"),
                           (["--temperatures", "0.1"], "temperature study")]:
        with pytest.raises(SystemExit, match=message):
            main(["study", "--train-fractions", "0.5", "1", "--data", str(tmp_path), *extra])
    with pytest.raises(SystemExit, match="no train.csv"):
        main(["study", "--train-fractions", "0.5", "1", "--data", str(tmp_path)])


def test_the_command_runs_the_plan_it_was_given(monkeypatch, tmp_path):
    seen = {}

    def fake_run(data_dir, out_dir, plan, command=""):
        seen.update(plan=plan, out=out_dir, command=command)
        out_dir.mkdir(parents=True)
        (out_dir / "results.md").write_text("table\n")
        return {"cells": []}

    monkeypatch.setattr(scaling_study, "run_scaling_study", fake_run)
    (tmp_path / "train.csv").write_text("filepath\ttitle\n")
    (tmp_path / "heldout.csv").write_text("filepath\ttitle\n")
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--train-fractions", "1", "0.25", "0.5", "--data", str(tmp_path)]) == 0
    assert seen["plan"].fractions == [0.25, 0.5, 1.0] and seen["plan"].seeds == [0, 1, 2]   # the benchmark's seeds
    assert seen["out"] == Path("runs/study-scaling")
    assert seen["command"].endswith("--train-fractions 0.25 0.5 1 --seeds 0 1 2")
    assert main(["study", "--train-fractions", "1", "--seeds", "4", "--data", str(tmp_path), "--out", "o"]) == 0
    assert seen["plan"].seeds == [4]


# --- end to end -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_study_trains_tiny_models_on_nested_fractions_end_to_end(tmp_path):
    """Six real trainer runs (3 rows x 2 fractions, one seed, one epoch) on a digits corpus."""
    from conftest import write_digits_corpus

    data = write_digits_corpus(tmp_path / "corpus", n_train=128, n_heldout=32)
    emb = np.random.default_rng(0).normal(size=(128, 16)).astype(np.float32)
    np.save(data / "train.emb.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    plan = scaling_study.ScalingPlan(fractions=[0.5, 1], seeds=[0],
                               budget_override={"epochs": 1, "batch_size": 32, "warmup": 1, "workers": 0})
    results = scaling_study.run_scaling_study(data, tmp_path / "out", plan, command="e2e")
    assert results["complete"] and [c["status"] for c in results["cells"]] == ["ok"] * 6
    assert [c["pairs"] for c in results["cells"]] == [64] * 3 + [128] * 3
    subset = tmp_path / "out" / "subsets" / "train-0.5.csv"
    assert len(subset.read_text().splitlines()) == 65
    for cell in results["cells"]:
        assert 0 <= cell["retrieval_R@1"] <= 1 and cell["centroid_gap"] > 0
    assert all(t is not None for t in results["trend"])
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
