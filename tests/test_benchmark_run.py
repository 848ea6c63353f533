"""The benchmark's wiring, with the trainer and the evaluation replaced by fakes (each real piece has tests
of its own): interleaved speed windows, per-configuration memory, corpus record and comparison."""
import hashlib
import json
import logging

import pytest

from openclip_align.experiments import benchmark as bench
from openclip_align.experiments.initialisation import INIT_KEYS
from openclip_align.experiments.trainer_processes import TrainResult

RATE = {"upstream CLIP": 400.0, "SharedCLIP": 380.0, "AlignCLIP": 360.0, "CLIP-Refine": 300.0,
        "AlignCLIP on-the-fly (MiniLM)": 160.0}
RSS = {"upstream CLIP": 900.0, "SharedCLIP": 950.0, "AlignCLIP": 1000.0, "CLIP-Refine": 1500.0,
       "AlignCLIP on-the-fly (MiniLM)": 1300.0}
METRICS = {"centroid_gap": 0.4, "image_to_text_R@1": 0.03, "text_to_image_R@1": 0.02, "alignment_score": 0.5}


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    rows = ["filepath\ttitle\tindex"] + [f"{tmp_path}/data/images/{i}.png\tcaption {i}\t{i}" for i in range(1100)]
    for i in range(1100):
        (tmp_path / "data" / "images" / f"{i}.png").write_bytes(b"picture %d" % i)
    (tmp_path / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "data" / "heldout.csv").write_text("\n".join(rows[:201]) + "\n")
    manifest = {"counts": {"train": 1100, "heldout": 200}, "encoder": {"model": "enc"}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return tmp_path / "data", hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@pytest.fixture
def fake_init(monkeypatch):
    """The initialisation table, faked: records what it was asked to measure."""
    asked = []

    def measure_initialisation(data_dir, models, seeds, limit=None, device="cpu"):
        asked.append((data_dir, tuple(models), tuple(seeds), limit, device))
        row = {key: {"mean": 0.8, "std": 0.02, "values": [0.8] * len(seeds)} for key in INIT_KEYS}
        row["pairs"] = limit or 200
        return {"models": {name: row for name in models}, "seeds": list(seeds), "seconds": 3.0}

    monkeypatch.setattr(bench, "measure_initialisation", measure_initialisation)
    return asked


@pytest.fixture
def fakes(monkeypatch, fake_init):
    calls, plots = [], []

    def train(spec, train_data, budget, seed, logs, name=None, keep_checkpoint=True, progress=False, **_):
        window = name is not None
        override = spec.budget_override
        calls.append({"label": spec.label, "name": name or f"{spec.label}-seed{seed}", "data": train_data,
                      "extra": spec.extra, "window": window, "epochs": override.get("epochs"),
                      "log_every": override.get("log_every"), "progress": progress, "keep": keep_checkpoint})
        # windows use a little less memory than whole training runs; the report keeps each row's maximum
        return TrainResult(spec.label, seed, logs / (name or f"{spec.label}-seed{seed}") / "epoch.pt",
                           RATE[spec.label] * (1 + 0.01 * seed), RSS[spec.label] - (50 if window else 0), None,
                           10.0, logs)

    def evaluate_with_posthoc(model, checkpoint, data_dir, kinds, device="cpu", plot_paths=None, plot_titles=None):
        for kind, path in (plot_paths or {}).items():
            plots.append((path.name, plot_titles[kind]))
        # a post-hoc row's gap is smaller than its trained row's, so the rows can be told apart
        return {kind: {**METRICS, "centroid_gap": METRICS["centroid_gap"] / (2 if kind else 1)}
                for kind in (None, *kinds)}

    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr(bench, "evaluate_with_posthoc", evaluate_with_posthoc)
    monkeypatch.setattr(bench, "metric_time_100k", lambda: 1.0)
    return calls, plots


def test_speed_windows_alternate_and_memory_and_corpus_are_recorded(tmp_path, corpus, fakes, fake_init, caplog):
    data, manifest_sha = corpus
    calls, plots = fakes
    baseline = tmp_path / "baselines"
    baseline.mkdir()
    other = {"created": "2026-11-20 10:00:00", "tracks": {},
             "data": {"corpus": {"sha256": "0" * 64, "sha256_of": "manifest.json", "train_pairs": 1090,
                                 "heldout_pairs": 200}}}
    (baseline / "cpu-quick.json").write_text(json.dumps(other))
    with caplog.at_level(logging.INFO):
        results = bench.run_benchmark(data, tmp_path / "out", quick=True, seeds=[0, 1], tracks=["scratch"],
                                      baseline=baseline)
    training = [c for c in calls if not c["window"]]
    windows = [c for c in calls if c["window"]]
    assert len(training) == 8 and all(c["progress"] and c["data"] == str(data / "train.csv") for c in training)
    labels = list(RATE)
    assert [c["label"] for c in windows] == labels + labels[1:] + labels[:1]        # round 2 starts one further
    assert all(c["epochs"] == 1 and c["log_every"] == 1 and not c["keep"] for c in windows)
    refine = [c for c in windows if c["label"] == "CLIP-Refine"][0]
    assert refine["extra"][refine["extra"].index("--pretrained") + 1].endswith("upstream CLIP-seed0/epoch.pt")
    assert refine["data"].endswith("window-1024.csv")          # 2 steps of 512: what 1,100 pairs allow
    assert [c for c in windows if c["label"] == "SharedCLIP"][0]["data"].endswith("window-1024.csv")

    track = results["tracks"]["scratch"]
    speed = track["speed"]
    assert speed["SharedCLIP"]["ratio_to_upstream"] == pytest.approx(380 / 400)
    assert speed["AlignCLIP on-the-fly (MiniLM)"]["ratio_to_upstream"] == pytest.approx(160 / 400)
    # each row its own maximum: the training runs' where there are any, the speed-only row's windows
    assert {label: s["peak_rss_mb"] for label, s in speed.items()} == {**RSS, "AlignCLIP on-the-fly (MiniLM)": 1250.0}
    assert track["speed_method"]["interleaved_rounds"] == 2 and "busy" in track["speed_method"]

    machine = results["machine"]            # what README's blocks print about the machine, as recorded
    assert machine["cpus"] >= 1 and len(machine["load_at_start"]) == len(machine["load_at_end"]) == 3
    record = results["data"]["corpus"]
    # the manifest predates content hashes: the pairs are hashed from the files (200 held-out rows repeat the
    # first 200 training rows, so the two splits count separately), the manifest's own hash kept beside
    assert {k: record[k] for k in ("sha256", "sha256_of", "train_pairs", "heldout_pairs", "content_pairs",
                                   "content_from")} == \
        {"sha256": manifest_sha, "sha256_of": "manifest.json", "train_pairs": 1100, "heldout_pairs": 200,
         "content_pairs": {"heldout": 200, "train": 1100}, "content_from": "the corpus files, at the run"}
    assert results["comparison"]["status"] == "different corpus" and results["flags"] == []
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Not compared with the `cpu-quick` baseline" in report and "1,090 training" in report
    assert "ratio to upstream CLIP (median [min–max] over rounds)" in report
    assert (tmp_path / "out" / "figures" / "quality.png").exists()
    assert json.loads((baseline / "cpu-quick.json").read_text()) == other           # the baseline is never written
    trained = ["upstream CLIP", "SharedCLIP", "AlignCLIP"]
    posthoc = [f"{label} + {name}" for label in trained for name in ("centring", "standardising", "gap shift")]
    # each trained row is followed by its post-hoc rows, CLIP-Refine (a refinement of upstream CLIP) has none
    assert list(track["quality"]) == [row for label in trained for row in (label, *[p for p in posthoc
                                      if p.startswith(label + " +")])] + ["CLIP-Refine"]
    assert track["quality"]["SharedCLIP + gap shift"]["centroid_gap"]["mean"] == pytest.approx(0.2)
    assert track["plan"]["posthoc"] == {"of": trained, "kinds": ["centre", "standardise", "shift"],
                                        "fitted_on": "train.csv", "train_pairs": 1100, "shift_lambda": 0.5}
    assert "| AlignCLIP + standardising |" in report and "statistics of its 1,100 training pairs only" in report
    assert sorted(p for p in plots if "_+_" not in p[0]) == [
        ("pca_scratch_AlignCLIP.png", "AlignCLIP: AlignCLIP-Tiny, --loss imsep\nTrained from scratch (Tiny models), "
                                      "held-out pairs"),
        ("pca_scratch_CLIP-Refine.png", "CLIP-Refine: DualCLIP-Tiny, --loss refine\nTrained from scratch (Tiny models), "
                                        "held-out pairs"),
        ("pca_scratch_SharedCLIP.png", "SharedCLIP: SharedCLIP-Tiny, --loss clip\nTrained from scratch (Tiny models), "
                                       "held-out pairs"),
        ("pca_scratch_upstream_CLIP.png", "upstream CLIP: DualCLIP-Tiny, --loss clip (OpenCLIP alone)\nTrained from "
                                          "scratch (Tiny models), held-out pairs")]
    assert "every run's live log is under" in caplog.text and "speed round 2/2" in caplog.text
    # the table at initialisation: once per run, 5 seeds whatever the tracks' seeds, --quick caps the pairs at 256
    assert fake_init == [(data, ("DualCLIP-Tiny", "SharedCLIP-Tiny"), (0, 1, 2, 3, 4), 256, "cpu")]
    assert results["initialisation"]["device"] == "cpu" and results["initialisation"]["limit"] == 256
    assert "\n## At initialisation\n" in report and "| SharedCLIP-Tiny | 256 | 0.800 ± 0.020 |" in report
    assert "measured by the GPU variant (`--gpu`) only" in report and "Measured in 3 s." in report
    assert report.index("## At initialisation") < report.index("## Regressions against the baseline")


def test_a_failed_speed_baseline_keeps_the_training_runs_and_the_evaluation(tmp_path, corpus, fakes, monkeypatch):
    data, _ = corpus
    calls, _ = fakes
    fake_train = bench.train

    def train(spec, *args, name=None, **kwargs):
        if name is not None and spec.label == "upstream CLIP":
            raise RuntimeError("training run upstream_CLIP-round0 failed; log tail:\nMemoryError: out of memory")
        return fake_train(spec, *args, name=name, **kwargs)
    monkeypatch.setattr(bench, "train", train)
    results = bench.run_benchmark(data, tmp_path / "out", quick=True, seeds=[0], tracks=["scratch"])
    track = results["tracks"]["scratch"]
    assert track["speed"] == {} and track["skipped"] == {"speed of upstream CLIP": "MemoryError: out of memory"}
    assert {label for label in track["quality"] if " + " not in label} == {"upstream CLIP", "SharedCLIP", "AlignCLIP",
                                                                         "CLIP-Refine"}
    assert "| speed of upstream CLIP | not run: MemoryError: out of memory |" in (tmp_path / "out" / "results.md").read_text()


def test_training_runs_side_by_side_refine_after_its_seed_and_results_in_seed_order(tmp_path, monkeypatch):
    """Two at a time, one thread each: every seed's CLIP-Refine starts only once that seed's base run has
    finished (it reads the checkpoint), and each label's results come back in seed order whatever the
    finishing order (later seeds finish first here)."""
    import threading
    import time

    events, lock = [], threading.Lock()

    def train(spec, train_data, budget, seed, logs, progress=False, threads=None, **_):
        with lock:
            events.append(("start", spec.label, seed, threads, spec.extra))
        time.sleep(0.05 * (3 - seed))
        with lock:
            events.append(("end", spec.label, seed))
        return TrainResult(spec.label, seed, logs / f"{spec.label}-{seed}.pt", 1.0, 1.0, None, 1.0, logs)

    monkeypatch.setattr(bench, "train", train)
    track = bench.scratch_track(tmp_path, quick=True, gpu=False)
    trained = bench.train_side_by_side(track, tmp_path / "train.csv", tmp_path / "logs", [0, 1, 2], 2)

    assert list(trained) == [*track.specs, "CLIP-Refine"]
    for label, results in trained.items():
        assert [r.seed for r in results] == [0, 1, 2]
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 3 * (len(track.specs) + 1) and {e[3] for e in starts} == {1}
    for seed in range(3):
        base_end = events.index(("end", track.refine_from, seed))
        refine_start = next(i for i, e in enumerate(events) if e[:3] == ("start", "CLIP-Refine", seed))
        assert refine_start > base_end
    running, peak = 0, 0
    for event in events:
        running += 1 if event[0] == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    # a ready CLIP-Refine starts before base runs of later seeds still waiting: the last start is not a lone refine
    first_refine = next(i for i, e in enumerate(starts) if e[1] == "CLIP-Refine")
    assert any(e[1] != "CLIP-Refine" and e[2] > 0 for e in starts[first_refine + 1:])


def test_parallel_runs_default_two_on_cpu_one_on_gpu(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.parallel_runs_default("cpu") == 2 and bench.parallel_runs_default("cuda") == 1
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 1)
    assert bench.parallel_runs_default("cpu") == 1


@pytest.mark.parametrize("device, quick, models, limit", [
    ("cpu", False, ("DualCLIP-Tiny", "SharedCLIP-Tiny"), None),          # every held-out pair
    ("cuda", False, ("ViT-B-16", "SharedCLIP-ViT-B-16"), 512),
    ("cuda", True, ("ViT-B-16", "SharedCLIP-ViT-B-16"), 256),
])
def test_initialisation_models_and_pairs_per_variant_always_five_seeds(tmp_path, fake_init, device, quick, models,
                                                                        limit):
    init = bench.initialisation(tmp_path, device, quick)
    assert fake_init == [(tmp_path, models, (0, 1, 2, 3, 4), limit, device)]
    assert init["limit"] == limit and init["device"] == device
    assert ("note" in init) == (device == "cpu")          # only a CPU run says ViT-B-16 was left out


def test_a_failed_initialisation_is_recorded_and_reported_not_raised(tmp_path, monkeypatch):
    from openclip_align.experiments.initialisation import initialisation_lines

    def fail(*args, **kwargs):
        raise FileNotFoundError("heldout.csv")
    monkeypatch.setattr(bench, "measure_initialisation", fail)
    init = bench.initialisation(tmp_path, "cpu", False)
    assert init["skipped"] == "FileNotFoundError: heldout.csv" and "models" not in init
    assert initialisation_lines(init) == ["Not measured: FileNotFoundError: heldout.csv."]
