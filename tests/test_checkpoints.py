"""Checkpoints: atomic writes, no checkpoint of a diverged model, --resume latest past an unreadable file
(issue 16), with the plugin and as the upstream patch."""
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _trainer_launch import train
from _upstream_tree import upstream_tree
from openclip_align.atomic_files import umask_mode
from openclip_align.integration import checkpoints, run_state, trainer_adapter

PATCHES = Path(__file__).resolve().parent.parent / "patches"
PATCH = PATCHES / "open_clip-atomic-checkpoints.patch"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncated_copy(good: Path, bad: Path) -> None:
    """What upstream's direct torch.save leaves when the process is killed half way through."""
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A trainer run whose checkpoint folder is tmp_path/checkpoints, with the save hook installed."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    trainer_adapter.patch_torch_save()
    monkeypatch.setattr(run_state, "RUN", SimpleNamespace(args=SimpleNamespace(checkpoint_path=str(folder))))
    return folder


def _checkpoint(epoch, value=1.0):
    return {"epoch": epoch, "name": "t", "state_dict": {"w": torch.full((4, 3), value), "b": torch.zeros(3)}}


def test_hook_is_installed_once_and_leaves_other_paths_alone(run_folder, tmp_path):
    first = torch.save
    trainer_adapter.patch_torch_save()
    assert torch.save is first and torch.save.__wrapped__ is not None
    elsewhere = tmp_path / "not-a-checkpoint.pt"
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}}, elsewhere)    # not ours to judge
    assert torch.isnan(torch.load(elsewhere)["state_dict"]["w"]).all()


def test_checkpoint_written_atomically_with_the_umask_permissions(run_folder):
    target = run_folder / "epoch_1.pt"
    torch.save(_checkpoint(1), str(target))
    assert torch.equal(torch.load(target)["state_dict"]["w"], torch.ones(4, 3))
    assert (target.stat().st_mode & 0o777) == umask_mode(0o666)
    assert sorted(p.name for p in run_folder.iterdir()) == ["epoch_1.pt"]          # no temporary left


def test_diverged_weights_are_never_saved_and_the_old_file_stays(run_folder):
    target = run_folder / "epoch_1.pt"
    torch.save(_checkpoint(1), str(target))
    before = _sha(target)
    bad = _checkpoint(2)
    bad["state_dict"]["w"][1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match=r"not writing .*epoch_1.pt.*after epoch 2.*\(w\)"):
        torch.save(bad, str(target))
    assert _sha(target) == before and sorted(p.name for p in run_folder.iterdir()) == ["epoch_1.pt"]


def test_non_finite_tensors_names_exactly_the_bad_ones():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([5]),
             "c": torch.tensor([-float("inf")], dtype=torch.float64), "d": torch.zeros(2, dtype=torch.bfloat16)}
    assert checkpoints.non_finite_tensors(state) == ["b", "c"]


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_whole(run_folder):
    """The process dies (SIGKILL, no cleanup) while epoch_2.pt is being written over an older epoch_2.pt."""
    target = run_folder / "epoch_2.pt"
    torch.save(_checkpoint(2, value=7.0), str(target))
    before = _sha(target)
    code = textwrap.dedent(f"""
        import os, signal, torch
        from types import SimpleNamespace
        from openclip_align.integration import run_state, trainer_adapter
        trainer_adapter.patch_torch_save()
        run_state.RUN = SimpleNamespace(args=SimpleNamespace(checkpoint_path={str(run_folder)!r}))
        class DiesWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save({{"epoch": 3, "state_dict": {{"w": torch.ones(1000, 100)}}, "x": DiesWhilePickled()}},
                   {str(target)!r})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    assert _sha(target) == before                                          # the final name untouched
    leftovers = [p for p in run_folder.iterdir() if p.name != "epoch_2.pt"]
    assert len(leftovers) == 1 and not leftovers[0].name.endswith(".pt")   # invisible to --resume latest
    torch.save(_checkpoint(3), str(run_folder / "epoch_3.pt"))             # the next save clears it
    assert sorted(p.name for p in run_folder.iterdir()) == ["epoch_2.pt", "epoch_3.pt"]


def test_resume_latest_falls_back_to_the_newest_readable_checkpoint(run_folder, caplog):
    torch.save(_checkpoint(1), str(run_folder / "epoch_1.pt"))
    torch.save(_checkpoint(2), str(run_folder / "epoch_2.pt"))
    _truncated_copy(run_folder / "epoch_2.pt", run_folder / "epoch_10.pt")
    (run_folder / "epoch_9.pt").write_bytes(b"not a checkpoint")
    shas = {p.name: _sha(p) for p in run_folder.iterdir()}
    args = SimpleNamespace(resume=str(run_folder / "epoch_10.pt"))
    with caplog.at_level(logging.WARNING):
        checkpoints.fall_back_from_unreadable(args, resume_latest=True)
    assert args.resume == str(run_folder / "epoch_2.pt")
    assert "epoch_10.pt" in caplog.text and "epoch_9.pt" in caplog.text and "epoch_2.pt instead" in caplog.text
    assert {p.name: _sha(p) for p in run_folder.iterdir()} == shas                 # nothing deleted or changed

    explicit = SimpleNamespace(resume=str(run_folder / "epoch_10.pt"))            # --resume PATH: the user's call
    checkpoints.fall_back_from_unreadable(explicit, resume_latest=False)
    assert explicit.resume.endswith("epoch_10.pt")


def test_resume_latest_with_no_readable_checkpoint_is_a_clear_error(run_folder):
    (run_folder / "epoch_1.pt").write_bytes(b"garbage")
    (run_folder / "epoch_2.pt").write_bytes(b"")
    args = SimpleNamespace(resume=str(run_folder / "epoch_2.pt"))
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* can be read: .*epoch_2.pt.*epoch_1.pt.*--resume PATH"):
        checkpoints.fall_back_from_unreadable(args, resume_latest=True)
    assert (run_folder / "epoch_1.pt").read_bytes() == b"garbage"


# --- the same change as an upstream patch -----------------------------------------------------------
def test_patch_applies_alone_and_after_the_other_upstream_patches(tmp_path):
    alone = upstream_tree(tmp_path / "alone")
    check = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=alone, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    stacked = upstream_tree(tmp_path / "stacked")
    for other in sorted(PATCHES.glob("*.patch")):
        if other != PATCH:
            subprocess.run(["git", "apply", str(other)], cwd=stacked, check=True)
    check = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=stacked, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_patched_upstream_saves_atomically_and_resumes_past_a_truncated_checkpoint(tmp_path):
    tree = upstream_tree(tmp_path / "tree")
    subprocess.run(["git", "apply", str(PATCH)], cwd=tree, check=True)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    code = textwrap.dedent(f"""
        import os, torch
        import open_clip_train.main as m
        assert m.__file__.startswith({str(tree)!r})
        folder = {str(folder)!r}
        m.save_checkpoint({{"epoch": 1, "state_dict": {{"w": torch.ones(3)}}}}, os.path.join(folder, "epoch_1.pt"))
        class Fails:
            def __reduce__(self):
                raise KeyboardInterrupt
        try:
            m.save_checkpoint({{"epoch": 2, "x": Fails()}}, os.path.join(folder, "epoch_2.pt"))
        except KeyboardInterrupt:
            pass
        print("after failed save:", sorted(os.listdir(folder)))
        data = open(os.path.join(folder, "epoch_1.pt"), "rb").read()
        open(os.path.join(folder, "epoch_2.pt"), "wb").write(data[: len(data) // 2])
        print("latest:", os.path.basename(m.get_latest_checkpoint(folder, remote=False)))
    """)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OPENCLIP_ALIGN_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "after failed save: ['epoch_1.pt']" in out.stdout
    assert "latest: epoch_1.pt" in out.stdout
    assert "Skipping checkpoint" in out.stderr and "epoch_2.pt" in out.stderr


# --- end to end: `python -m open_clip_train.main` with the plugin ----------------------------------------
def _train(argv, logs: Path, name: str):
    return train(["--model", "AlignCLIP-Tiny", "--dataset-type", "csv", "--batch-size", "16", "--workers", "0",
                  "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--seed", "0", "--opt", "sgd", *argv],
                 logs, name, check=False)


@pytest.fixture(scope="module")
def one_epoch(digits_csv, tmp_path_factory):
    """A finished first epoch of one step (16 pairs, batch 16): logs/run/checkpoints/epoch_1.pt."""
    root = tmp_path_factory.mktemp("one_epoch")
    csv = root / "train.csv"
    csv.write_text("\n".join(digits_csv.read_text().splitlines()[:17]) + "\n")
    out = _train(["--train-data", str(csv), "--epochs", "1", "--lr", "0.01"], root / "logs", "run")
    assert out.returncode == 0, out.stderr[-3000:]
    return csv, root / "logs"


def _copy_run(one_epoch, tmp_path):
    csv, logs = one_epoch
    shutil.copytree(logs, tmp_path / "logs")
    return csv, tmp_path / "logs", tmp_path / "logs" / "run" / "checkpoints"


def test_resume_latest_past_a_checkpoint_truncated_by_a_kill(one_epoch, tmp_path):
    csv, logs, folder = _copy_run(one_epoch, tmp_path)
    _truncated_copy(folder / "epoch_1.pt", folder / "epoch_2.pt")     # upstream's save killed half way
    first = _sha(folder / "epoch_1.pt")
    out = _train(["--train-data", str(csv), "--epochs", "2", "--lr", "0.01", "--resume", "latest"], logs, "run")
    assert out.returncode == 0, out.stderr[-3000:]
    log = (logs / "run" / "out.log").read_text()
    assert f"skipping {folder / 'epoch_2.pt'}, which cannot be read" in log
    assert f"resuming from {folder / 'epoch_1.pt'} instead" in log
    assert torch.load(folder / "epoch_2.pt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert _sha(folder / "epoch_1.pt") == first and sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt", "epoch_2.pt"]


def test_a_last_update_that_diverges_is_never_saved(one_epoch, tmp_path):
    """One step per epoch: the loss of that step is finite (computed before the update), the weights after
    it are not; the check after the epoch stops the run, no epoch_2.pt is written and epoch_1.pt stays as it
    was."""
    csv, logs, folder = _copy_run(one_epoch, tmp_path)
    first = _sha(folder / "epoch_1.pt")
    out = _train(["--train-data", str(csv), "--epochs", "2", "--lr", "3e38", "--resume", "latest"], logs, "run")
    assert out.returncode != 0
    # every rank checks the weights after the epoch, before evaluation and rank 0's save (rank_agreement)
    assert "FloatingPointError: the model's weights after epoch 2 hold NaN/inf values (" in out.stderr
    assert "Contrastive_loss: nan" not in (logs / "run" / "out.log").read_text()     # the loss itself was finite
    assert _sha(folder / "epoch_1.pt") == first and sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt"]


# --- a resume reads the checkpoint once (issue 29 item 5) ---------------------------------------------
def test_a_resume_reads_the_checkpoint_once_and_restores_the_loss_state_from_that_read(tmp_path, monkeypatch):
    """Upstream's resume load (the plugin-wrapped pt_load that main calls) is the only read: it hands the
    plugin its record, out of the optimizer state, and the SogCLR state comes back with the saved values."""
    from open_clip_train import file_utils

    from openclip_align.integration import loss_adapter, loss_state, trainer_adapter
    from openclip_align.losses.sogclr import SogCLRLoss

    saved = {"log_s_image": torch.arange(6, dtype=torch.float32) / 7, "log_s_text": -torch.arange(6.0) / 3,
             "visited": torch.tensor([True, False, True, True, False, False])}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)},
                "optimizer": {"state": {}, "param_groups": [],
                              "openclip_align": {"loss": "sogclr", "options": {}, "state": saved}}}, str(path))
    monkeypatch.setattr(run_state, "RUN", None)
    run = run_state.start_run(SimpleNamespace(loss="sogclr", resume=str(path), distributed=False))
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or load(*a, **k))

    checkpoint = file_utils.pt_load(str(path), map_location="cpu")           # what main does to resume
    assert checkpoint["optimizer"] == {"state": {}, "param_groups": []}       # the record is the plugin's
    assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))
    run.loss_module = loss_adapter.TrainerLossAdapter(run, SogCLRLoss(num_samples=6))
    run.loss_module.place("cpu")
    loss_state.restore_loss_state(run, str(path), trainer_adapter.read_resume_checkpoint)
    assert reads == [str(path)]                                               # read once
    state = run.loss_module.loss.state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
