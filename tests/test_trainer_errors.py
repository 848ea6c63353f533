"""Common trainer mistakes end in one line naming the input and the fix, not a traceback (issue 18, item 7)."""
import os

import pytest
import torch
from open_clip_train.data import expand_urls

from _trainer_launch import error_lines, train
from openclip_align.integration.trainer_errors import (
    CheckpointMismatchError, UserInputError, explain_checkpoint_mismatch)

FAST = ["--dataset-type", "csv", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--warmup", "1",
        "--precision", "fp32", "--device", "cpu"]


def trainer(argv, tmp_path, **env_extra):
    return train([*argv, *FAST], tmp_path / "logs", check=False, env=env_extra, cwd=tmp_path, timeout=300)


def one_line_error(out):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = error_lines(out)
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


# --- the data file check at scale (issue 29 item 6): every file on one rank, spot checks on the others -----
def _shards(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def _checked(monkeypatch, args, world_size, rank):
    """check_trainer_inputs under a launcher of ``world_size`` ranks; the paths it stat'ed."""
    from openclip_align.integration import trainer_errors

    for var in ("LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
                "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    seen = []
    exists = os.path.exists
    monkeypatch.setattr(trainer_errors.os.path, "exists", lambda p: seen.append(p) or exists(p))
    try:
        trainer_errors.check_trainer_inputs(args, expand_urls)
    finally:
        monkeypatch.setattr(trainer_errors.os.path, "exists", exists)
    return [path for path in seen if str(path).endswith(".tar")]      # not the imports' own lookups


def _args(spec):
    from types import SimpleNamespace

    return SimpleNamespace(model="AlignCLIP-Tiny", pretrained=None, train_data=spec, val_data=None,
                           dataset_type="webdataset")


def test_before_distributed_init_a_rank_of_many_stats_one_file_per_folder_and_the_last(monkeypatch, tmp_path):
    _shards(tmp_path / "a", [f"{i:05d}.tar" for i in range(50) if i != 20])      # 00020.tar is missing
    _shards(tmp_path / "b", [f"{i:05d}.tar" for i in range(50)])
    spec = f"{tmp_path}/a/{{00000..00049}}.tar::{tmp_path}/b/{{00000..00049}}.tar"
    seen = _checked(monkeypatch, _args(spec), world_size=8, rank=3)
    assert seen == [f"{tmp_path}/a/00000.tar", f"{tmp_path}/b/00000.tar", f"{tmp_path}/b/00049.tar"]
    with pytest.raises(UserInputError, match=r"/a/00020\.tar does not exist"):    # one process: every file
        _checked(monkeypatch, _args(spec), world_size=1, rank=0)


def test_a_mistyped_folder_is_refused_on_every_rank_before_distributed_init(monkeypatch, tmp_path):
    _shards(tmp_path / "a", ["00000.tar", "00001.tar"])
    spec = f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/typo/{{00000..00001}}.tar"
    for rank in (0, 5):
        with pytest.raises(UserInputError, match=r"/typo/00000\.tar \(and 1 more\) does not exist"):
            _checked(monkeypatch, _args(spec), world_size=8, rank=rank)


def test_after_distributed_init_rank_0_checks_every_file(monkeypatch, tmp_path):
    from openclip_align.integration import trainer_errors

    _shards(tmp_path / "a", [f"{i:05d}.tar" for i in range(50) if i != 20])
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(UserInputError, match=r"/a/00020\.tar does not exist") as caught:
        trainer_errors.check_data_files_once(_args(f"{tmp_path}/a/{{00000..00049}}.tar"), expand_urls)  # rank 0 (no group)
    assert caught.value.shared                   # raised by every rank: nothing to announce to the others
    monkeypatch.setenv("WORLD_SIZE", "1")        # one process: done before, nothing more here
    trainer_errors.check_data_files_once(_args(f"{tmp_path}/a/{{00000..00049}}.tar"), expand_urls)
