"""measurements/gpu_check.py's CPU dry run (Tiny models) and its results; measurements/gpu_check.sh's shape."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "measurements" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "measurements" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _check_results(out: Path, models, losses):
    results = json.loads((out / "results.json").read_text())
    runs = results["train"]
    assert [(r["model"], r["loss"]) for r in runs] == [(m, l) for m in models for l in losses]
    for run in runs:
        assert "error" not in run, run
        assert run["finite"] is True and run["samples_per_s"] > 0 and run["peak_gpu_memory_gib"] is None
        # samples/s is the timed steps' samples over their seconds
        assert run["samples_per_s"] == pytest.approx(run["steps"] * run["batch_size"] / run["timed_s"], rel=0.02)
    speed = {(r["model"], r["loss"]): r["samples_per_s"] for r in runs}
    for loss in losses:
        assert results["ratios"][f"AlignCLIP/SharedCLIP {loss}"] == pytest.approx(
            speed["AlignCLIP-Tiny", loss] / speed["SharedCLIP-Tiny", loss], abs=1e-3)
    for model in models:
        assert results["ratios"][f"refine/clip {model}"] == pytest.approx(
            speed[model, "refine"] / speed[model, "clip"], abs=1e-3)
    embed = results["embed"]
    assert embed["captions_per_s"] > 0 and embed["command_captions"] == embed["captions"]
    assert embed["cc12m_10m_captions_hours"] == pytest.approx(1e7 / embed["captions_per_s"] / 3600, rel=0.01)
    md = (out / "results.md").read_text()
    assert all(f"| {m} | {l} |" in md for m in models for l in losses) and "CC12M" in md
    return results


def test_dry_run_on_tiny_models(tmp_path):
    """Every (model, loss) of the GPU check trains its steps on CPU with finite losses, without compilation here
    (the compiled path is the slow test below and tests/test_flag_stack.py's compile check)."""
    out = tmp_path / "check"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--compile-backend", "none", "--embed-captions", "8",
                         "--embed-batch-size", "8"])
    assert rc == 0
    results = _check_results(out, gpu_check.DRY_MODELS, gpu_check.LOSSES)
    assert results["config"]["batch_size"] == 8 and results["environment"]["device"] == "cpu"
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_dry_run_compiled(tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    assert _check_results(out, gpu_check.DRY_MODELS, gpu_check.LOSSES)["config"]["compile_backend"] == "aot_eager"


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    real = gpu_check.train_speed

    def flaky(model_name, loss_name, cfg, device):
        if loss_name == "imsep":
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(model_name, loss_name, cfg, device)

    monkeypatch.setattr(gpu_check, "train_speed", flaky)
    out = tmp_path / "check"
    rc = gpu_check.main(["--dry-run", "--out", str(out), "--compile-backend", "none", "--models", "AlignCLIP-Tiny",
                         "--skip-embed"])
    assert rc == 1                                                 # a failed run never exits 0
    results = json.loads((out / "results.json").read_text())
    assert [r["loss"] for r in results["train"]] == list(gpu_check.LOSSES)
    assert "out of memory" in results["train"][1]["error"]
    assert results["ratios"] == {"refine/clip AlignCLIP-Tiny": pytest.approx(
        results["train"][2]["samples_per_s"] / results["train"][0]["samples_per_s"], abs=1e-3)}
    assert "| AlignCLIP-Tiny | imsep | failed: RuntimeError: CUDA out of memory" in (out / "results.md").read_text()


def test_ratios_from_hand_made_runs():
    runs = [{"model": "SharedCLIP-ViT-B-16", "loss": "clip", "samples_per_s": 1000.0},
            {"model": "AlignCLIP-ViT-B-16", "loss": "clip", "samples_per_s": 900.0},
            {"model": "SharedCLIP-ViT-B-16", "loss": "refine", "samples_per_s": 600.0},
            {"model": "AlignCLIP-ViT-B-16", "loss": "imsep", "error": "x"}]
    assert gpu_check.ratios(runs) == {"AlignCLIP/SharedCLIP clip": 0.9, "refine/clip SharedCLIP-ViT-B-16": 0.6}


def test_the_device_script_parses_and_documents_its_call():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    header = SCRIPT.read_text()
    assert 'carry=[".whl", ".gpu_check"]' in header and "timeout_s=600" in header
    usage = subprocess.run(["bash", str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert usage.returncode == 2 and "prepare|device" in usage.stdout
