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
from _dist import spawn  # noqa: E402

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
