"""What happens once before step 1 and after every epoch of a trainer run.

Before step 1 (:func:`attach`, when the first epoch starts): the batch stash is reset, a loss
that wants raw features gets the model's raw training forward, the loss (and its state) moves to the
training device, the teacher is placed, evaluation's forward tallies raw features for ``--gap-metrics``,
the optimizer's ``state_dict`` carries the plugin's record, and a resumed run restores the loss state.
After each epoch (:func:`check_after_epoch`): finite loss and finite weights, agreed on by every rank.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from . import checkpoints, rank_agreement
from .eval_gap_metrics import tallying_eval_forward
from .loss_adapter import TrainerLossAdapter, raw_feature_forward
from .loss_state import record_in_checkpoint, restore_loss_state
from .run_state import TrainerRun
from .teacher import input_recorder, prepare_teacher


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)             # DDP
    return getattr(model, "_orig_mod", model)           # torch.compile


def attach(run: TrainerRun, model, optimizer, args, read_checkpoint: Callable[[str], object]) -> None:
    """Once per run, before step 1; ``read_checkpoint(path)`` is the resume load, should upstream's not
    have happened (see :func:`.loss_state.restore_loss_state`)."""
    run.attached = True
    run.stash.reset(args.accum_freq)
    if run.spec is not None:
        if run.spec.raw_features:
            inner = unwrap(model)
            if not hasattr(inner, "encode_image"):
                raise TypeError(f"--loss {args.loss} needs a model with encode_image/encode_text")
            inner.forward = raw_feature_forward(inner, inner.forward)
        parameter = next(unwrap(model).parameters(), None)
        if run.loss_module is not None and parameter is not None:
            run.loss_module.place(parameter.device)          # before step 1 and before a resumed state loads
        if run.needs_teacher:
            prepare_teacher(run, unwrap(model), None)
            # the teacher runs on the student's own device inputs (no second host-to-device copy); the hook
            # sits on the outermost module, so it runs eagerly also when the student is compiled
            model.register_forward_pre_hook(input_recorder(run.stash))
    inner = unwrap(model)
    if args.gap_metrics and hasattr(inner, "encode_image") and hasattr(inner, "encode_text"):
        inner.forward = tallying_eval_forward(inner, inner.forward, run.raw_tally)
    if optimizer is not None:
        optimizer.register_state_dict_post_hook(lambda opt, state: record_in_checkpoint(run, state))
    if args.resume:
        restore_loss_state(run, args.resume, read_checkpoint)


def check_after_epoch(run: TrainerRun, model, loss, epoch: int) -> None:
    """Finite loss and finite weights, checked by every rank and agreed on (rank_agreement) before upstream
    evaluates and rank 0 saves: a rank that would refuse to go on never leaves the others waiting."""
    if run is None:
        return
    problems = [loss.problem()] if isinstance(loss, TrainerLossAdapter) else []
    bad = checkpoints.non_finite_tensors(unwrap(model).state_dict())
    if bad:
        problems.append(checkpoints.diverged_weights(bad, epoch + 1))
    rank_agreement.agree("; ".join(p for p in problems if p) or None, FloatingPointError)
