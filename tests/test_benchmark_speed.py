"""Benchmark speed: interleaved windows keep the ratios of a machine whose load changes, per-process peak
memory, progress lines, the windows' data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openclip_align.experiments import speed
from openclip_align.experiments.trainer_processes import _LAUNCHER, failure_tail, progress_line


TRUE_RATE = {"upstream": 400.0, "shared": 300.0, "align": 200.0}      # samples/s on an idle machine


def machine(slowdown_from: int, factor: float):
    """A machine that becomes ``factor`` times slower from its ``slowdown_from``-th window on."""
    calls = []

    def window(label, round_index):
        calls.append((label, round_index))
        load = factor if len(calls) > slowdown_from else 1.0
        return TRUE_RATE[label] / load
    return window, calls


def test_rotation_puts_every_configuration_at_every_position_once():
    labels = ["a", "b", "c"]
    orders = [speed.rotation(labels, r) for r in range(3)]
    for position in range(3):
        assert sorted(order[position] for order in orders) == labels
    assert all(sorted(order) == labels for order in orders)


def test_interleaved_median_ratio_survives_a_load_change_that_sequential_runs_do_not():
    labels = list(TRUE_RATE)
    window, calls = machine(slowdown_from=7, factor=4.0)      # 15 windows; the load arrives in round 2
    result = speed.interleave(labels, window, rounds=5, baseline="upstream")
    assert len(calls) == 15 and [c[1] for c in calls] == [r for r in range(5) for _ in labels]
    for label in labels:
        entry = result["speed"][label]
        assert entry["ratio_to_upstream"] == pytest.approx(TRUE_RATE[label] / TRUE_RATE["upstream"], rel=1e-12)
        assert entry["rounds"] == 5 and entry["ratio_min"] <= entry["ratio_to_upstream"] <= entry["ratio_max"]
    assert result["speed"]["align"]["ratio_max"] > result["speed"]["align"]["ratio_min"]   # the spread shows the change
    # the same machine measured one configuration after another reads align 4x too slow
    window, _ = machine(slowdown_from=7, factor=4.0)
    sequential = {label: [window(label, r) for r in range(5)] for label in labels}
    assert np.median(sequential["align"]) / np.median(sequential["upstream"]) == pytest.approx(0.125)


def test_a_failing_configuration_is_reported_and_the_baseline_failing_is_an_error():
    def window(label, round_index):
        if label == "align":
            raise RuntimeError("training run failed; log tail:\n...\nOSError: all-MiniLM-L6-v2 not found")
        return TRUE_RATE[label]
    result = speed.interleave(list(TRUE_RATE), window, rounds=3, baseline="upstream")
    assert result["skipped"] == {"align": "OSError: all-MiniLM-L6-v2 not found"}
    assert set(result["speed"]) == {"upstream", "shared"}
    with pytest.raises(RuntimeError):
        speed.interleave(list(TRUE_RATE), window, rounds=1, baseline="align")
    with pytest.raises(ValueError, match="baseline"):
        speed.interleave(["a"], window, rounds=1, baseline="upstream")


def test_busy_flag_and_its_sentence():
    quiet = speed.conditions(2, [0.2, 0.3, 0.5], [2.1, 1.2, 0.8], other_cores=0.1)
    busy = speed.conditions(2, [4.5, 4.0, 3.0], [6.2, 5.0, 3.5], other_cores=1.6)
    assert not quiet["busy"] and busy["busy"]
    assert speed.conditions(2, [1.5, 1, 1], [2, 2, 2], other_cores=None)["busy"]   # no /proc/stat: load before
    line = speed.conditions_line(busy)
    assert line.startswith("⚠ The machine was busy") and "4.5 / 4.0 / 3.0 before" in line and "6.2" in line
    assert "1.60 cores" in line
    assert speed.conditions_line(quiet).startswith("The machine was quiet")


def test_window_steps_follow_the_batch_and_the_corpus():
    plan = speed.SpeedPlan(samples=1024, min_steps=4, skip=2)
    assert plan.steps(64, 6821) == 16 and plan.steps(512, 6821) == 4 and plan.steps(512, 1500) == 2
    assert plan.skipped_steps(16) == 2 and plan.skipped_steps(4) == 1 and plan.skipped_steps(2) == 0
    with pytest.raises(ValueError, match="at least one batch"):
        plan.steps(512, 100)


def test_window_csv_takes_the_first_pairs_with_their_embeddings(tmp_path):
    rows = ["filepath\ttitle\tindex"] + [f"/img/{i}.png\tcaption {i}\t{i + 100}" for i in range(10)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    emb = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "train.emb.npy", emb)
    out = speed.window_csv(tmp_path / "train.csv", 6, tmp_path / "w")
    lines = out.read_text().splitlines()
    assert lines[0] == "filepath\ttitle\tindex" and len(lines) == 7
    assert lines[3] == "/img/2.png\tcaption 2\t2"                     # index renumbered 0..5
    np.testing.assert_array_equal(np.load(out.with_suffix("").with_suffix(".emb.npy")), emb[:6])


ALLOCATE = """
import sys
block = b"x" * (int(sys.argv[1]) * 2**20)      # every page written: resident
"""


def _peak_of_child(tmp_path, megabytes: int) -> float:
    stats = tmp_path / f"stats{megabytes}.json"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OPENCLIP_ALIGN_BENCH_STATS=str(stats))
    subprocess.run([sys.executable, "-c", _LAUNCHER, "allocate_for_test", str(megabytes)], env=env, check=True)
    return json.loads(stats.read_text())["peak_rss_mb"]


def test_peak_rss_is_each_training_process_own_not_the_parents(tmp_path):
    (tmp_path / "allocate_for_test.py").write_text(ALLOCATE)
    parent = b"p" * (600 * 2**20)               # the benchmark process is large (models it evaluated, ...)
    small, large = _peak_of_child(tmp_path, 50), _peak_of_child(tmp_path, 250)
    del parent
    assert 150 < large - small < 260             # the 200 MB more the second child wrote
    assert small < 450                           # not the parent's 600 MB+ carried over by fork/exec


def test_progress_line_condenses_the_trainers_last_step(tmp_path):
    log = tmp_path / "out.log"
    assert progress_line(log, 3, 30.0) == "starting (0.5 min)"
    log.write_text(
        "2026-11-24,10:00:00 | INFO | Train Epoch: 0 [  64/6821 (1%)] Data (t): 0.1 Batch (t): 0.2, 320.000/s, "
        "320.000/s/gpu LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 4.1589 (4.1589) Loss: 4.1589 (4.1589)\n"
        "2026-11-24,10:01:00 | INFO | Train Epoch: 1 [3200/6821 (47%)] Data (t): 0.1 Batch (t): 0.2, 381.234/s, "
        "381.234/s/gpu LR: 0.001000 Logit Scale: 15.000 Contrastive_loss: 3.5 (3.6) Loss: 3.5000 (3.6000)\n")
    assert progress_line(log, 3, 125.0) == "epoch 2/3, 47% of it, 381 samples/s, loss 3.5 (2.1 min)"


def test_a_failed_runs_tail_ends_with_the_trainers_error_not_torchs_exit_report():
    console = ("2026-11-24,20:41:40 | ERROR | loss became non-finite (nan) at step 3: lower --lr\n"
               + "".join(f"I1124 20:41:45.8{i:05d} 14545 site-packages/torch/_dynamo/utils.py:925] metrics {i}\n"
                         for i in range(200)))
    tail = failure_tail(console)
    assert tail.splitlines()[-1].endswith("became non-finite (nan) at step 3: lower --lr")
    assert "W1124 warning kept" in failure_tail(console + "W1124 warning kept\n")
