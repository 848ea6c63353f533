"""Common trainer mistakes end in one line naming the input and the fix, not a traceback (issue 18, item 7)."""
import os
import subprocess
import sys

import pytest
import torch

from openclip_align.integration.trainer_errors import (
    CheckpointMismatchError, UserInputError, explain_checkpoint_mismatch)

FAST = ["--dataset-type", "csv", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--warmup", "1",
        "--precision", "fp32", "--device", "cpu"]


def trainer(argv, tmp_path, **env_extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **env_extra)
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    cmd = [sys.executable, "-m", "open_clip_train.main", *argv, *FAST, "--logs", str(tmp_path / "logs")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def one_line_error(out):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("open_clip_train.main: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def test_misspelled_model_names_close_matches(digits_csv, tmp_path):
    line = one_line_error(trainer(["--model", "AlignCLIP-Tny", "--train-data", str(digits_csv)], tmp_path))
    assert "--model AlignCLIP-Tny" in line and "AlignCLIP-Tiny" in line
    line = one_line_error(trainer(["--model", "ViT-B-33", "--train-data", str(digits_csv)], tmp_path))
    assert "--model ViT-B-33" in line and "ViT-B-32" in line                  # upstream names too


def test_missing_train_data_names_the_file(tmp_path):
    line = one_line_error(trainer(["--model", "AlignCLIP-Tiny", "--train-data", "nothere.csv"], tmp_path))
    assert "--train-data nothere.csv" in line and "does not exist" in line and str(tmp_path) in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.pt"))


def test_missing_shard_in_a_pattern_is_named(digits_csv, tmp_path):
    (tmp_path / "s-000000.tar").write_bytes(b"")
    line = one_line_error(trainer(["--model", "AlignCLIP-Tiny", "--train-data", "s-{000000..000002}.tar",
                                   "--train-num-samples", "8"], tmp_path))
    assert "s-000001.tar" in line and "(and 1 more)" in line


def test_checkpoint_of_another_architecture(digits_csv, tmp_path):
    import open_clip

    other = open_clip.create_model("DualCLIP-Tiny")
    path = tmp_path / "dual.pt"
    torch.save({"state_dict": other.state_dict()}, path)
    out = trainer(["--model", "AlignCLIP-Tiny", "--pretrained", str(path), "--train-data", str(digits_csv)], tmp_path)
    line = one_line_error(out)
    # a SharedCLIP model is told which layouts it loads (OpenCLIP's own, the AlignCLIP authors')
    assert f"{path} fits no checkpoint layout AlignCLIP-Tiny loads" in line
    assert "the --model it was trained as" in line
    assert path.stat().st_size > 0                                                  # the checkpoint is untouched


def test_traceback_switch_shows_the_traceback(tmp_path):
    out = trainer(["--model", "AlignCLIP-Tny", "--train-data", "x.csv"], tmp_path, OPENCLIP_ALIGN_TRACEBACK="1")
    assert out.returncode != 0 and "Traceback" in out.stderr and "UserInputError" in out.stderr


def test_mismatch_message_counts_what_load_state_dict_reports():
    """Counts read off PyTorch's own message for a hand-made mismatch: 1 missing, 2 unexpected, 1 shape."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    state = {"0.weight": torch.zeros(3, 2), "1.weight": torch.zeros(5, 3), "1.bias": torch.zeros(4),
             "extra.a": torch.zeros(1), "extra.b": torch.zeros(1)}
    with pytest.raises(RuntimeError) as caught:
        model.load_state_dict(state)
    err = explain_checkpoint_mismatch(caught.value, "M", "ckpt.pt")
    assert isinstance(err, CheckpointMismatchError) and isinstance(err, RuntimeError)
    assert isinstance(err, UserInputError)
    assert "1 tensors missing, 2 unexpected, 1 of another shape (first: 0.bias)" in str(err)
