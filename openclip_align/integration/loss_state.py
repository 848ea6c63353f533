"""The plugin's record in a checkpoint (loss name and options, a stateful loss's state, the teacher's
fingerprint) and its restore on ``--resume``.

The record rides inside ``checkpoint["optimizer"]`` under :data:`.checkpoints.PLUGIN_KEY`, added by a
post-hook of the optimizer's ``state_dict`` (see docs/how-it-hooks-in.md); the resume load takes it out
again (:func:`.checkpoints.load_once`), so the file is read once.
"""
from __future__ import annotations

import logging
from typing import Callable

from . import checkpoints
from .run_state import TrainerRun
from .trainer_args import loss_option_names


def record_in_checkpoint(run: TrainerRun, optimizer_state: dict) -> dict:
    """Optimizer ``state_dict`` post-hook: add the plugin's record (rank 0 writes the file)."""
    if run.loss_module is not None:
        run.loss_module.check_finite(shared=False)   # rank 0 only: check_after_epoch had every rank agree
    args = run.args
    record = {"loss": args.loss, "options": {k: getattr(args, k, None) for k in loss_option_names(args.loss)}}
    if run.spec is not None and run.spec.stateful and run.loss_module is not None:
        record["state"] = {k: v.detach().cpu() for k, v in run.loss_module.loss.state_dict().items()}
    if run.teacher_sha256:
        record["teacher_sha256"] = run.teacher_sha256
    optimizer_state[checkpoints.PLUGIN_KEY] = record
    return optimizer_state


def restore_loss_state(run: TrainerRun, path: str, read_checkpoint: Callable[[str], object]) -> None:
    """The plugin's part of a resume, from the record upstream's own resume load found (the file is read
    once per rank: see checkpoints.load_once; the run keeps it in ``resumed_records``); ``read_checkpoint(path)``
    makes that load, returning the record, only when it did not happen."""
    record = run.resumed_records.pop(str(path), checkpoints.NOT_LOADED)
    if record is checkpoints.NOT_LOADED:
        record = read_checkpoint(path)
    loss = run.args.loss
    if record is None:
        if run.spec is not None and (run.spec.stateful or run.needs_teacher):
            raise RuntimeError(f"--resume {path}: the checkpoint has no openclip-align record, so the state of "
                               f"--loss {loss} cannot be restored; start a new run instead of resuming")
        return
    if record.get("loss") != loss:
        logging.warning("openclip-align: resuming with --loss %s from a checkpoint trained with --loss %s",
                        loss, record.get("loss"))
        if run.spec is not None and run.spec.stateful:
            raise RuntimeError(f"--resume {path}: checkpoint was trained with --loss {record.get('loss')}, "
                               f"not {loss}; the per-sample state of {loss} cannot be restored")
    if run.spec is not None and run.spec.stateful:
        if "state" not in record:
            raise RuntimeError(f"--resume {path}: the checkpoint's openclip-align record has no state for --loss "
                               f"{loss} (written by an older openclip-align); start a new run instead of resuming")
        # adopt the loaded tensors (memory-mapped from the file) instead of copying them into the fresh
        # state, then move them to the training device: no second full host copy of a large state
        run.loss_module.loss.load_state_dict(record["state"], assign=True)
        if run.loss_module._device is not None:
            run.loss_module.place(run.loss_module._device)
        logging.info("openclip-align: restored --loss %s state from %s", loss, path)
    if run.needs_teacher and record.get("teacher_sha256") and record["teacher_sha256"] != run.teacher_sha256:
        raise RuntimeError(
            f"--resume {path}: the teacher (the model before refinement) differs from the one this run "
            "started from; pass the same --model/--pretrained as the original run")
