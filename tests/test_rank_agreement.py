"""Every rank agrees (issue 29 item 4): a finding of one rank stops all of them, naming it, within seconds.

The fast tests run the agreement logic in a 2-process gloo group; the slow ones run the trainer as two
torchrun "nodes" on localhost (one ``torchrun --nnodes 2 --node-rank R`` process each), with a failure
that only one of them meets, and check that both end well before gloo's 30-minute timeout with the cause
in each node's output.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _dist import free_port, spawn  # noqa: E402
from _trainer_launch import HARNESS, NICE, torchrun_command, train, trainer_env  # noqa: E402

from openclip_align.integration import checkpoints, rank_agreement  # noqa: E402


# --- the agreement logic, without processes ---------------------------------------------------------
def test_describe_names_each_rank_that_found_a_problem():
    assert rank_agreement.describe([None, None]) is None
    assert rank_agreement.describe(["disk full"]) == "disk full"                     # one process: as it is
    assert rank_agreement.describe([None, "NaN", None, "gone"]) == "rank 1: NaN; rank 3: gone"


def test_outside_a_distributed_run_agree_raises_the_local_error():
    rank_agreement.agree(None)
    with pytest.raises(FloatingPointError, match=r"^loss NaN$"):
        rank_agreement.agree("loss NaN", FloatingPointError)
    assert rank_agreement.announce_failure("nobody listens", grace=0) is False


def test_after_an_epoch_non_finite_weights_stop_the_run_naming_the_tensors(monkeypatch):
    from openclip_align.integration import before_train, run_state

    monkeypatch.setattr(run_state, "RUN", None)
    run = run_state.start_run(SimpleNamespace(loss="clip", resume=None))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    before_train.check_after_epoch(run, model, None, epoch=0)                         # finite: nothing to say
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^the model's weights after epoch 3 hold NaN/inf values \(1\.bias\)"):
        before_train.check_after_epoch(run, model, None, epoch=2)


# --- two ranks in a gloo group ------------------------------------------------------------------------
def _agree_worker(rank, world_size, out_dir):
    outcome = []
    rank_agreement.agree(None)                                   # nobody found anything: nobody raises
    try:
        rank_agreement.agree("weights hold NaN" if rank == 1 else None, FloatingPointError)
    except FloatingPointError as err:
        outcome.append(str(err))
    dist.barrier()                                               # both came back: nobody waits in a collective
    Path(out_dir, f"rank{rank}.txt").write_text("\n".join(outcome))


def test_a_problem_found_by_one_rank_stops_both_naming_it(tmp_path):
    spawn(_agree_worker, 2, str(tmp_path), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "stopping on every rank: rank 1: weights hold NaN"


def _fallback_worker(rank, world_size, root):
    os.chdir(Path(root, f"node{rank}"))        # each node's own view of the checkpoint folder
    args = SimpleNamespace(resume=os.path.join("checkpoints", "epoch_3.pt"))
    checkpoints.fall_back_from_unreadable(args, resume_latest=True)
    Path(root, f"rank{rank}.txt").write_text(args.resume)


def _save(path: Path, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "state_dict": {"w": torch.ones(4) * epoch}}, str(path))


@pytest.mark.slow
def test_resume_latest_falls_back_to_the_newest_checkpoint_every_rank_can_read(tmp_path):
    """Node 0 reads epoch_3 and epoch_2; node 1's epoch_3 is truncated and its epoch_2 garbage: both ranks
    resume from epoch_1 (each deciding alone, rank 0 would take epoch_3 and rank 1 epoch_2)."""
    for node in ("node0", "node1"):
        for epoch in (1, 2, 3):
            _save(tmp_path / node / "checkpoints" / f"epoch_{epoch}.pt", epoch)
    good = (tmp_path / "node1" / "checkpoints" / "epoch_3.pt").read_bytes()
    (tmp_path / "node1" / "checkpoints" / "epoch_3.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "node1" / "checkpoints" / "epoch_2.pt").write_bytes(b"not a checkpoint")
    spawn(_fallback_worker, 2, str(tmp_path), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == os.path.join("checkpoints", "epoch_1.pt")


def _no_readable_worker(rank, world_size, root):
    os.chdir(Path(root, f"node{rank}"))
    args = SimpleNamespace(resume=os.path.join("checkpoints", "epoch_1.pt"))
    try:
        checkpoints.fall_back_from_unreadable(args, resume_latest=True)
        message = "resumed from " + args.resume
    except RuntimeError as err:
        message = str(err)
    Path(root, f"rank{rank}.txt").write_text(message)


@pytest.mark.slow
def test_when_one_rank_can_read_no_checkpoint_every_rank_stops_naming_it(tmp_path):
    _save(tmp_path / "node0" / "checkpoints" / "epoch_1.pt", 1)
    (tmp_path / "node1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "node1" / "checkpoints" / "epoch_1.pt").write_bytes(b"")
    spawn(_no_readable_worker, 2, str(tmp_path), timeout=120)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("--resume latest: no checkpoint in checkpoints can be read: ")
        assert "epoch_1.pt (rank 1: " in message and "--resume PATH" in message


def _watch_worker(rank, world_size, root):
    logging.basicConfig(filename=str(Path(root, f"rank{rank}.log")), level=logging.INFO, force=True)
    rank_agreement.watch_for_failures(poll=0.2)
    dist.barrier()                               # both watch before anyone fails
    if rank == 1:
        rank_agreement.announce_failure("OSError: [Errno 28] No space left on device: epoch_1.pt", grace=2.0)
        return
    time.sleep(60)                               # stands for a collective that would wait for rank 1


@pytest.mark.slow
def test_a_failure_one_rank_announces_ends_the_other_rank_naming_it(tmp_path):
    # rank 0 would sleep out its 60 s and exit 0: exit code 1 is its watcher ending it on rank 1's word
    with pytest.raises(mp.ProcessExitedException, match="process 0 terminated with exit code 1"):
        spawn(_watch_worker, 2, str(tmp_path), timeout=120)
    assert "stopping rank 0: rank 1: OSError: [Errno 28] No space left on device: epoch_1.pt" in \
        (tmp_path / "rank0.log").read_text()


# --- two torchrun "nodes" on localhost, a failure met by one of them ----------------------------------
BOUND_S = 180               # well below gloo's 30-minute collective timeout (a busy 2-core machine needs ~60 s)


def two_nodes(argv, cwds, fault=None, fault_rank=None):
    """One ``torchrun --nnodes 2 --node-rank R --nproc-per-node 1`` of the harness per node (its own working
    directory), ``fault`` arranged on node ``fault_rank`` only; returns [(returncode, stdout + stderr)] per
    node, each bounded by BOUND_S."""
    import subprocess

    port = free_port()
    env = trainer_env(OMP_NUM_THREADS="1", HARNESS_FAULT=fault or "", HARNESS_FAULT_RANK=str(fault_rank))
    procs = []
    for node, cwd in enumerate(cwds):
        cmd = [*NICE, *torchrun_command(HARNESS, nproc=1, nnodes=2, node_rank=node, port=port), *argv]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results, deadline = [], time.monotonic() + BOUND_S
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:          # past the bound: the test fails below, leave nothing running
                proc.kill()
                proc.communicate()
    return results


def _trainer_argv(csv: Path, *flags, epochs=1):
    return ["--model", "DualCLIP-Tiny", "--train-data", str(csv), "--dataset-type", "csv", "--batch-size", "8",
            "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--seed", "0",
            "--log-every-n-steps", "1", "--opt", "sgd", "--wd", "0", "--lr", "0.01", "--epochs", str(epochs), *flags]
    # --wd 0: timm's optimizer groups a DDP-wrapped model's parameters differently from a bare model's when
    # weight decay is on (no_weight_decay() is not seen through DDP), so a 1-process checkpoint would not
    # resume on 2 ranks; that is timm's, not what these tests are about


@pytest.fixture(scope="module")
def one_step_csv(tmp_path_factory):
    """16 pairs: one step of 2 ranks x 8."""
    from conftest import write_digits_csv

    return write_digits_csv(tmp_path_factory.mktemp("agree_data"), n=16)


def _nodes(tmp_path):
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    return cwds


@pytest.mark.slow
def test_two_nodes_stop_together_when_one_rank_holds_non_finite_weights(one_step_csv, tmp_path):
    cwds = _nodes(tmp_path)
    results = two_nodes(_trainer_argv(one_step_csv, "--log-root", "logs", "--name", "run"), cwds, "weights", 1)
    for code, out in results:
        assert code != 0, out[-3000:]
        assert "stopping on every rank: rank 1: the model's weights after epoch 1 hold NaN/inf values" in out
    assert not (cwds[0] / "logs" / "run" / "checkpoints" / "epoch_1.pt").exists()    # rank 0 saved nothing


@pytest.mark.slow
def test_two_nodes_stop_together_when_one_rank_sees_a_non_finite_loss(one_step_csv, tmp_path):
    cwds = _nodes(tmp_path)
    argv = _trainer_argv(one_step_csv, "--loss", "cyclip", "--log-root", "logs", "--name", "run")
    results = two_nodes(argv, cwds, "loss", 1)
    for code, out in results:
        assert code != 0, out[-3000:]
        assert "stopping on every rank: rank 1: --loss cyclip became non-finite" in out


@pytest.mark.slow
def test_two_nodes_stop_together_when_rank_0_cannot_save(one_step_csv, tmp_path):
    """Rank 0 alone writes checkpoints; its failed write used to leave rank 1 in upstream's barrier."""
    cwds = _nodes(tmp_path)
    (cwds[0] / "logs" / "run" / "checkpoints" / "epoch_1.pt").mkdir(parents=True)    # the write cannot land
    results = two_nodes(_trainer_argv(one_step_csv, "--log-root", "logs", "--name", "run"), cwds)
    (code0, out0), (code1, out1) = results
    assert code0 != 0 and code1 != 0, out0[-2000:] + out1[-2000:]
    assert "IsADirectoryError" in out0
    assert "stopping rank 1: rank 0: IsADirectoryError" in out1 and "epoch_1.pt" in out1


@pytest.mark.slow
def test_two_nodes_resume_from_the_same_checkpoint_when_one_node_cannot_read_the_latest(one_step_csv, tmp_path):
    """Each node resumes from its own folder (relative --logs, a working directory per node); node 1's
    epoch_2.pt is truncated: both resume from epoch_1.pt and train on, instead of one from each."""
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    out = train(_trainer_argv(one_step_csv, "--log-root", "logs", "--name", "run", epochs=2), cwd=first, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    cwds = _nodes(tmp_path)
    for cwd in cwds:
        shutil.copytree(first / "logs", cwd / "logs")
    node1 = cwds[1] / "logs" / "run" / "checkpoints" / "epoch_2.pt"
    node1.write_bytes(node1.read_bytes()[: node1.stat().st_size // 2])
    results = two_nodes(_trainer_argv(one_step_csv, "--log-root", "logs", "--name", "run", "--resume", "latest",
                                      epochs=3), cwds)
    for code, out in results:
        assert code == 0, out[-3000:]
        assert "epoch_2.pt, which cannot be read (rank 1: " in out
        assert "resuming from logs/run/checkpoints/epoch_1.pt instead" in out
    assert torch.load(cwds[0] / "logs" / "run" / "checkpoints" / "epoch_3.pt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_two_nodes_stop_together_when_one_node_lacks_the_caption_embeddings(tmp_path):
    """Each node reads its own copy of the data (a relative --train-data); node 1's has no train.emb.npy.
    Rank 1 fails while building its dataset, rank 0 has gone on into the next collective: it stops on
    rank 1's word, naming the missing file, instead of waiting for the collective's timeout."""
    import numpy as np
    from conftest import write_digits_csv

    cwds = _nodes(tmp_path)
    for cwd in cwds:
        write_digits_csv(cwd / "data", n=16)
    vectors = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    np.save(cwds[0] / "data" / "train.emb.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    argv = _trainer_argv(Path("data") / "train.csv", "--model", "AlignCLIP-Tiny", "--loss", "imsep",
                         "--semantic-source", "precomputed", "--log-root", "logs", "--name", "run")
    (code0, out0), (code1, out1) = two_nodes(argv, cwds)
    assert code0 != 0 and code1 != 0, out0[-2000:] + out1[-2000:]
    assert "data/train.emb.npy does not exist" in out1
    assert "stopping rank 0: rank 1: MissingExtrasError: --loss needs semantic caption embeddings but " \
           "data/train.emb.npy does not exist" in out0


@pytest.mark.slow
def test_two_nodes_stop_together_when_one_node_lacks_the_column_folder(digits_csv, tmp_path):
    """Webdataset shards with their caption-embedding columns in a folder of their own (relative
    --semantic-embeddings, a working directory per node); node 1 has the shards but not the column folder.
    Rank 0 checks the columns for every rank before step 1; rank 1 meets the missing folder when it decodes
    its first sample: both end, each naming it."""
    import shutil

    from openclip_align.data.column import write_column
    from _shard_fixtures import unit_vectors, write_shards

    cwds = _nodes(tmp_path)
    parts = [range(0, 16), range(16, 32)]
    emb = unit_vectors(32)

    def strip(i, sample):
        del sample["emb.npy"]
        sample["txt"] = f"pair {i}"

    write_shards(cwds[0] / "shards", digits_csv, parts, edit=strip)
    for shard, part in enumerate(parts):
        keys = [f"{i:09d}" for i in part]
        write_column(str(cwds[0] / "shards" / f"shard-{shard:06d}.tar"), str(cwds[0] / "columns"), keys,
                     emb[list(part)], model="all-MiniLM-L6-v2", index_start=part[0], shard_keys=keys)
    shutil.copytree(cwds[0] / "shards", cwds[1] / "shards")
    argv = _trainer_argv("shards/shard-{000000..000001}.tar", "--model", "AlignCLIP-Tiny", "--loss", "imsep",
                         "--dataset-type", "webdataset", "--train-num-samples", "32", "--semantic-source",
                         "precomputed", "--semantic-embeddings", "columns", "--log-root", "logs", "--name", "run")
    (code0, out0), (code1, out1) = two_nodes(argv, cwds)
    assert code0 != 0 and code1 != 0, out0[-2000:] + out1[-2000:]
    assert "stopping rank 0: rank 1: " in out0 and "columns" in out0.split("stopping rank 0: rank 1: ")[1]
