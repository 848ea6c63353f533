"""`openclip-align study --temperatures`: Mind the Gap's fixed-temperature fine-tuning (issue 25, item 3)."""
import json
import math
from pathlib import Path

import pytest
import torch

from openclip_align.experiments import grid_study, temperature_study
from openclip_align.experiments.trainer_processes import Budget, TrainResult
from openclip_align.publishing import committed_copy
from openclip_align.publishing.readme import update_temperature_block
from openclip_align.cli import main

LOCKS = ["--lock-image", "--lock-image-unlocked-groups", "2", "--lock-image-freeze-bn-stats",
         "--lock-text", "--lock-text-unlocked-layers", "2", "--lock-text-freeze-layer-norm"]
MIND_THE_GAP_T = [0.01, 0.02, 0.0333, 0.05, 0.1, 1.0]


def checkpoint(path: Path, logit_scale: float, prefix: str = "") -> Path:
    """A trainer-style checkpoint whose learned logit scale is ``logit_scale`` (stored as its log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 2, "name": "start", "state_dict": {f"{prefix}logit_scale": torch.tensor(math.log(logit_scale)),
                                                            f"{prefix}proj.weight": torch.eye(3)}}, path)
    return path


def value_after(flags: list, flag: str):
    return flags[flags.index(flag) + 1] if flag in flags else None


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """train() and evaluate_model() replaced: every trainer run recorded, the 'metrics' made from its label."""
    calls = []

    def fake_train(spec, train_data, budget, seed, logs, progress=False, **kwargs):
        calls.append({"spec": spec, "budget": Budget(**{**budget.__dict__, **spec.budget_override}), "seed": seed,
                      "train_data": train_data})
        ckpt = checkpoint(logs / spec.label.replace(" ", "_") / "epoch.pt", 1 / 0.05 if spec.label == "start CLIP"
                          else 10.0)
        return TrainResult(spec.label, seed, ckpt, 100.0, 1.0, None, 1.0, logs)

    def fake_evaluate(model, ckpt, data_dir, device="cpu", **kwargs):
        return {"centroid_gap": 0.5, "alignment_score": 0.4, "image_to_text_R@1": 0.1, "text_to_image_R@1": 0.2,
                "zeroshot_a_top1": 0.3, "zeroshot_b_top1": 0.5, "rmg": 0.1}

    for module in (temperature_study, grid_study):          # the start model here, the rows through grid_study.train_and_score
        monkeypatch.setattr(module, "train", fake_train)
        monkeypatch.setattr(module, "evaluate_model", fake_evaluate)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("filepath\ttitle\n")
    (data / "heldout.csv").write_text("filepath\ttitle\n")
    return calls, data


def test_temperatures_outside_01_to_1_are_refused_with_the_reason(capsys):
    for bad in ("0.005", "2", "0"):
        with pytest.raises(SystemExit):
            main(["study", "--temperatures", "0.1", bad])
        err = capsys.readouterr().err
        assert f"T = {bad}" in err and "must lie in [0.01, 1]" in err and "clamps the logit scale" in err
    with pytest.raises(SystemExit):
        main(["study", "--temperatures", "warm"])
    assert "expected a number such as 0.05, got 'warm'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeated"):
        temperature_study.check_temperatures([0.1, 0.1])
    with pytest.raises(ValueError, match="must lie in"):
        temperature_study.TemperaturePlan(temperatures=[1.5])
    assert temperature_study.check_temperatures(["0.01", 1]) == [0.01, 1.0]     # both ends are allowed


def test_grid_flags_and_a_lone_start_are_refused(tmp_path):
    for flags in (["--losses", "clip"], ["--optimizers", "sgd"], ["--seeds", "0", "1"], ["--epochs", "3"],
                  ["--regime", "scratch"], ["--lr", "adamw=0.1"]):
        with pytest.raises(SystemExit, match=f"{flags[0]} belong to the losses x optimizers grid"):
            main(["study", "--data", str(tmp_path), "--temperatures", "0.1", *flags])
    with pytest.raises(SystemExit, match="--start and --refine-lrs belong to the temperature study: pass --temperatures"):
        main(["study", "--data", str(tmp_path), "--start", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="no such checkpoint file"):
        main(["study", "--data", str(tmp_path), "--temperatures", "0.1", "--start", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="has no train.csv or heldout.csv"):
        main(["study", "--data", str(tmp_path / "nowhere"), "--temperatures", "0.1"])


def test_learned_logit_scale_is_exp_of_the_stored_log(tmp_path):
    assert temperature_study.learned_logit_scale(checkpoint(tmp_path / "a.pt", 42.5)) == pytest.approx(42.5, rel=1e-6)
    assert temperature_study.learned_logit_scale(checkpoint(tmp_path / "b.pt", 3.0, "module.")) == pytest.approx(3.0, rel=1e-6)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="no logit_scale"):
        temperature_study.learned_logit_scale(tmp_path / "c.pt")


def test_every_row_gets_its_trainer_flags_and_one_budget(fake_runs, tmp_path):
    """With --start: nine trainer runs (six temperatures, three CLIP-Refine), none for the start model."""
    calls, data = fake_runs
    start = checkpoint(tmp_path / "given" / "epoch_2.pt", 37.0)
    out = tmp_path / "out"
    code = main(["study", "--data", str(data), "--out", str(out), "--temperatures", *map(str, MIND_THE_GAP_T),
                 "--start", str(start)])
    assert code == 0
    assert len(calls) == 9
    fixed, refine = calls[:6], calls[6:]
    for call, t in zip(fixed, MIND_THE_GAP_T):
        extra = call["spec"].extra
        assert call["spec"].loss == "clip" and call["spec"].model == "DualCLIP-Lite0-MiniLM"
        assert float(value_after(extra, "--fixed-temperature")) == t
        assert value_after(extra, "--pretrained") == str(start)
        assert all(flag in extra for flag in LOCKS)
        assert call["seed"] == 0 and call["train_data"] == str(data / "train.csv")
    # the same budget for every temperature: one epoch at lr 1e-4, batch 64, warm-up 10, weight decay 0.1
    budgets = {tuple(sorted(c["budget"].__dict__.items())) for c in fixed}
    assert len(budgets) == 1
    b = fixed[0]["budget"]
    assert (b.epochs, b.lr, b.batch_size, b.warmup, b.wd, b.precision) == (1, 1e-4, 64, 10, 0.1, "fp32")
    # CLIP-Refine: the authors' recipe from the same start, HyCD raw / x the start's exp(log 37) / x 1
    assert [c["spec"].loss for c in refine] == ["refine"] * 3
    scales = [value_after(c["spec"].extra, "--hycd-logit-scale") for c in refine]
    assert scales[0] is None and float(scales[1]) == pytest.approx(37.0, rel=1e-6) and float(scales[2]) == 1.0
    for call in refine:
        extra = call["spec"].extra
        assert value_after(extra, "--pretrained") == str(start) and all(flag in extra for flag in LOCKS)
        assert value_after(extra, "--lr-scheduler") == "const" and value_after(extra, "--beta2") == "0.999"
        assert "--fixed-temperature" not in extra
        b = call["budget"]
        assert (b.epochs, b.lr, b.warmup, b.wd, b.batch_size, b.precision) == (1, 1e-6, 0, 0.1, 512, "fp32")
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["rows"]][:2] == ["start CLIP", "CLIP, T = 0.01"]
    assert results["start"]["logit_scale"] == pytest.approx(37.0, rel=1e-6)
    row = results["rows"][3]
    assert row["status"] == "ok" and row["zeroshot_top1"] == pytest.approx(0.4)      # mean of 0.3 and 0.5
    assert row["alignment_score"] == 0.4 and row["centroid_gap"] == 0.5
    assert "| CLIP, T = 0.0333 | T = 0.0333 | 0.500 | 0.400 | 10.0 | 20.0 | 40.0 |" in (out / "results.md").read_text()
    assert (out / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_start_the_pretrained_track_clip_row_is_trained_first(fake_runs, tmp_path):
    calls, data = fake_runs
    temperature_study.run_temperature_study(data, tmp_path / "out", temperature_study.TemperaturePlan(temperatures=[0.05, 1]))
    first = calls[0]
    assert first["spec"].loss == "clip" and first["spec"].extra == LOCKS and first["seed"] == 0
    assert (first["budget"].epochs, first["budget"].lr, first["budget"].batch_size, first["budget"].warmup) == \
        (2, 1e-3, 64, 20)
    start = str(tmp_path / "out" / "runs" / "start_CLIP" / "epoch.pt")      # where fake_train saved it
    assert [value_after(c["spec"].extra, "--pretrained") for c in calls[1:]] == [start] * 5
    # the start checkpoint fake_train wrote has logit scale 1/0.05 = 20
    assert float(value_after(calls[4]["spec"].extra, "--hycd-logit-scale")) == pytest.approx(20.0, rel=1e-6)


def test_refine_rows_at_each_learning_rate_beside_the_authors(fake_runs, tmp_path):
    """--refine-lrs 1e-6 1e-4: the three CLIP-Refine rows twice, the recipe unchanged but for the rate."""
    calls, data = fake_runs
    start = checkpoint(tmp_path / "given" / "epoch_2.pt", 37.0)
    out = tmp_path / "out"
    assert main(["study", "--data", str(data), "--out", str(out), "--temperatures", "0.1", "--start", str(start),
                 "--refine-lrs", "1e-6", "1e-4"]) == 0
    refine = calls[1:]
    assert len(refine) == 6 and [c["spec"].loss for c in refine] == ["refine"] * 6
    assert [c["budget"].lr for c in refine] == [1e-6] * 3 + [1e-4] * 3
    for call in refine:
        b = call["budget"]
        assert (b.epochs, b.warmup, b.wd, b.batch_size, b.precision) == (1, 0, 0.1, 512, "fp32")
        assert value_after(call["spec"].extra, "--lr-scheduler") == "const"
        assert value_after(call["spec"].extra, "--pretrained") == str(start)
    scales = [value_after(c["spec"].extra, "--hycd-logit-scale") for c in refine]
    assert scales[0] is None and scales[3] is None and float(scales[2]) == float(scales[5]) == 1.0
    assert float(scales[1]) == float(scales[4]) == pytest.approx(37.0, rel=1e-6)
    assert len({c["spec"].label for c in refine}) == 6           # six run folders, none overwritten
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["refine_lrs"] == [1e-6, 1e-4] and results["command"].endswith("--refine-lrs 1e-06 0.0001")
    rows = [r for r in results["rows"] if r["kind"] == "refine"]
    assert [r["lr"] for r in rows] == [1e-6] * 3 + [1e-4] * 3
    assert [r["label"] for r in rows] == [
        "CLIP-Refine lr 1e-06, raw-feature HyCD (authors')", "CLIP-Refine lr 1e-06, HyCD x start's scale",
        "CLIP-Refine lr 1e-06, HyCD x 1", "CLIP-Refine lr 0.0001, raw-feature HyCD (authors')",
        "CLIP-Refine lr 0.0001, HyCD x start's scale", "CLIP-Refine lr 0.0001, HyCD x 1"]
    text = (out / "results.md").read_text()
    assert "| CLIP-Refine lr 0.0001, HyCD x 1 | S = 1 (T = 1) | 0.500 | 0.400 | 10.0 | 20.0 | 40.0 |" in text
    assert "CLIP-Refine: the authors' recipe (lr 1e-06, batch 512, 1 epoch), and the same recipe at lr 0.0001)" in text


@pytest.mark.parametrize("bad", [["0"], ["1e-4", "1e-4"], ["1e-4", "0"]])
def test_bad_refine_learning_rates_are_refused(fake_runs, tmp_path, bad):
    _, data = fake_runs
    start = checkpoint(tmp_path / "given.pt", 30.0)
    with pytest.raises(SystemExit, match="--refine-lrs"):
        main(["study", "--data", str(data), "--temperatures", "0.1", "--start", str(start), "--refine-lrs", *bad])
    with pytest.raises(SystemExit, match="pass --temperatures too"):
        main(["study", "--data", str(data), "--refine-lrs", "1e-4"])


def test_the_default_out_folder_is_its_own(fake_runs, tmp_path, monkeypatch):
    _, data = fake_runs
    start = checkpoint(tmp_path / "given.pt", 30.0)
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--data", str(data), "--temperatures", "0.1", "--start", str(start)]) == 0
    assert (tmp_path / "runs" / "study-temperature" / "results.json").exists()
    assert not (tmp_path / "runs" / "study").exists()
    assert main(["study", "--data", str(data), "--out", "runs/study", "--temperatures", "0.1", "--start",
                 str(start)]) == 0                        # an explicit --out is kept, even the grid's default
    assert (tmp_path / "runs" / "study" / "results.json").exists()


def results_dict() -> dict:
    rows = [{"label": "start CLIP", "kind": "start", "temperature": 1 / 25.0, "logit_scale": 25.0, "status": "ok",
             "centroid_gap": 0.3, "alignment_score": 0.5, "image_to_text_R@1": 0.06, "text_to_image_R@1": 0.065,
             "zeroshot_top1": 0.27},
            {"label": "CLIP, T = 0.05", "kind": "fixed temperature", "temperature": 0.05, "status": "ok",
             "centroid_gap": 0.4123, "alignment_score": 0.3014, "image_to_text_R@1": 0.125,
             "text_to_image_R@1": 0.1, "zeroshot_top1": 1 / 3},
            {"label": "CLIP, T = 1", "kind": "fixed temperature", "temperature": 1.0, "status": "diverged"},
            {"label": "CLIP-Refine, raw-feature HyCD (authors')", "kind": "refine", "hycd_logit_scale": None,
             "temperature": None, "status": "ok", "centroid_gap": 0.35, "alignment_score": 0.45,
             "image_to_text_R@1": 0.05, "text_to_image_R@1": 0.06, "zeroshot_top1": 0.25},
            {"label": "CLIP-Refine, HyCD x 1", "kind": "refine", "hycd_logit_scale": 1.0, "temperature": 1.0,
             "status": "failed", "reason": "out of memory"}]
    return {"created": "2026-12-02 14:00:00", "command": "openclip-align study --temperatures 0.05 1",
            "plan": {"model": "DualCLIP-Lite0-MiniLM", "seed": 0, "temperatures": [0.05, 1.0],
                     "start_budget": {"batch_size": 64}, "finetune": {"epochs": 1, "lr": 1e-4, "warmup": 10},
                     "refine": {"epochs": 1, "lr": 1e-6, "batch_size": 512}},
            "start": {"checkpoint": "runs/x/epoch_2.pt", "logit_scale": 25.0, "temperature": 0.04},
            "rows": rows, "seconds": 600.0,
            "reference": {"model": "OpenAI CLIP", "data": "MSCOCO", "start_gap": 0.83,
                          "gaps": [[0.01, 1.0], [0.02, 0.8], [1 / 30, 0.64], [0.05, 0.55], [0.1, 0.3], [1.0, 0.24]]}}


def test_results_md_renders_each_row():
    text = temperature_study.markdown(results_dict())
    lines = text.splitlines()
    assert "| row | T or scale | centroid gap | alignment score | I→T R@1 | T→I R@1 | zero-shot top-1 |" in lines
    assert "| start CLIP | learned: T = 0.04 (scale 25) | 0.300 | 0.500 | 6.0 | 6.5 | 27.0 |" in lines
    assert "| CLIP, T = 0.05 | T = 0.05 | 0.412 | 0.301 | 12.5 | 10.0 | 33.3 |" in lines
    assert "| CLIP, T = 1 | T = 1 | diverged | | | | |" in lines
    assert "| CLIP-Refine, raw-feature HyCD (authors') | raw features (no scale) | 0.350 | 0.450 | 5.0 | 6.0 | 25.0 |" \
        in lines
    assert "| CLIP-Refine, HyCD x 1 | S = 1 (T = 1) | failed (out of memory) | | | | |" in lines
    assert ("Mind the Gap's published gaps (OpenAI CLIP fine-tuned on MSCOCO, from 0.83): 1.00 at T = 1/100, "
            "0.80 at T = 1/50, 0.64 at T = 1/30, 0.55 at T = 1/20, 0.30 at T = 1/10, 0.24 at T = 1.") in lines
    assert "Total time: 10.0 min. Figure: `temperature.png`." in lines


README = ("intro\n<!-- study:start -->\nGRID\n<!-- study:end -->\nmiddle\n"
          "<!-- study:temperature:start -->\nOLD\n<!-- study:temperature:end -->\ntail\n")


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    readme, results = tmp_path / "README.md", tmp_path / "results.json"
    readme.write_text(README)
    results.write_text(json.dumps(results_dict()))
    assert update_temperature_block(readme, results)
    text = readme.read_text()
    before, block = text.split("<!-- study:temperature:start -->\n")
    block, after = block.split("<!-- study:temperature:end -->")
    assert before == "intro\n<!-- study:start -->\nGRID\n<!-- study:end -->\nmiddle\n" and after == "\ntail\n"
    assert "OLD" not in block and "| CLIP, T = 0.05 | T = 0.05 | 0.412 |" in block
    assert block.startswith("From `openclip-align study --temperatures 0.05 1`, 2026-12-02 14:00:00")
    assert "![temperature study](study/temperature/temperature.png)" in block
    assert update_temperature_block(readme, results) and readme.read_text() == text      # idempotent
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    assert not update_temperature_block(bare, results) and bare.read_text() == "no markers\n"


def test_publish_copies_the_run_into_the_committed_folder_and_readme(tmp_path, capsys):
    run, committed, readme = tmp_path / "run", tmp_path / "study" / "temperature", tmp_path / "README.md"
    run.mkdir()
    source = json.dumps(results_dict())
    (run / "results.json").write_text(source)
    (run / "results.md").write_text("old report")
    readme.write_text(README)
    assert committed_copy.main(["--temperature-study", str(run), "--to-temperature-study", str(committed),
                         "--readme", str(readme)]) == 0
    assert json.loads((committed / "results.json").read_text()) == json.loads(source)
    assert (committed / "results.md").read_text() == temperature_study.markdown(results_dict())
    assert (committed / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| CLIP, T = 0.05 |" in readme.read_text() and "GRID" in readme.read_text()
    assert (run / "results.md").read_text() == "old report" and (run / "results.json").read_text() == source
    assert "rewrote study:temperature" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="make study-temperature"):
        committed_copy.main(["--temperature-study", str(tmp_path / "empty"), "--to-temperature-study", str(committed)])


@pytest.mark.slow
def test_end_to_end_on_tiny_models(tmp_path):
    """Real trainer runs: a DualCLIP-Tiny start, two temperatures and the three CLIP-Refine rows."""
    from conftest import write_digits_corpus

    data = write_digits_corpus(tmp_path / "corpus", n_train=48, n_heldout=32)
    plan = temperature_study.TemperaturePlan(
        temperatures=[0.02, 1.0], model="DualCLIP-Tiny", extra=[],
        start_budget=Budget(epochs=1, batch_size=16, warmup=1), finetune={"epochs": 1, "lr": 1e-4, "warmup": 1},
        refine={**temperature_study.REFINE_RECIPE, "batch_size": 16}, refine_lrs=[1e-6, 1e-4])
    results = temperature_study.run_temperature_study(data, tmp_path / "out", plan)
    assert [r["status"] for r in results["rows"]] == ["ok"] * 9
    # refine at 1e-4 moves the weights away from the start, at 1e-6 hardly: 100x the rate, (about) 100x the step
    start = torch.load(results["start"]["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    moved = {}
    for row in (r for r in results["rows"] if r["kind"] == "refine" and r["hycd_logit_scale"] is None):
        weights = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        moved[row["lr"]] = sum(float((weights[k].float() - start[k].float()).norm()) for k in start
                               if k in weights and start[k].is_floating_point())
    assert moved[1e-4] > 10 * moved[1e-6] > 0
    fixed = [r for r in results["rows"] if r["kind"] == "fixed temperature"]
    for row in fixed:            # the fine-tuned checkpoint kept the fixed scale log(1/T)
        assert temperature_study.learned_logit_scale(Path(row["checkpoint"])) == pytest.approx(1 / row["temperature"],
                                                                                         rel=1e-5)
    assert (tmp_path / "out" / "temperature.png").exists()
