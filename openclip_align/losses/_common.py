"""Pieces shared by the losses of this package: argument checks, the CLIP term, the output convention."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistributedConfig
from .options import Option, add_flags, constructor_kwargs


def check_pair(loss_name: str, image_features: torch.Tensor, text_features: torch.Tensor) -> int:
    """Image and text features must be (B, d) tensors of the same shape; returns B."""
    for what, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"--loss {loss_name}: {what} must be a (batch, dim) tensor, got {shape}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"--loss {loss_name}: image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (one row per pair)")
    return image_features.shape[0]


# Set by the trainer while it calls a loss with per-pair inputs it validated on the host before step 1.
_INPUTS_VALIDATED = contextvars.ContextVar("openclip_align_inputs_validated", default=False)


@contextlib.contextmanager
def inputs_validated():
    """Inside this block the losses skip their per-call value checks (finite values, index ranges).

    The trainer validates every per-pair input once on the host (the whole csv embedding file when it is loaded,
    index ranges against the dataset size, each shard sample as it is decoded), so checking again per step
    would only add a device-to-host synchronisation. Shape checks are free and always run.
    """
    token = _INPUTS_VALIDATED.set(True)
    try:
        yield
    finally:
        _INPUTS_VALIDATED.reset(token)


def check_values(tensor: torch.Tensor) -> bool:
    """Whether a value check of ``tensor`` is wanted and free of a device sync: a CPU tensor, outside
    :func:`inputs_validated`. On an accelerator reading a value back would stall the host every step,
    so there only shapes are checked (a non-finite input then shows up as a non-finite loss)."""
    return tensor.device.type == "cpu" and not _INPUTS_VALIDATED.get()


def check_rows(loss_name: str, what: str, tensor: Optional[torch.Tensor], batch: int, hint: str,
               dim: Optional[int] = 2) -> torch.Tensor:
    """A per-pair input: present, ``batch`` rows, finite when floating point (checked where
    :func:`check_values` says it is free)."""
    if tensor is None:
        raise ValueError(f"--loss {loss_name} needs {what} (one row per pair) but none was given; {hint}")
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor)
    expected = f"({batch}, dim)" if dim == 2 else f"({batch},)"
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"--loss {loss_name}: {what} must be a {dim}-d tensor of shape {expected}, "
                         f"got shape {tuple(tensor.shape)}")
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        raise ValueError(f"--loss {loss_name}: {what} has shape {tuple(tensor.shape)} but the batch has {batch} "
                         f"pairs; expected {expected}")
    if tensor.is_floating_point() and check_values(tensor) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"--loss {loss_name}: {what} contains non-finite values (NaN or inf)")
    return tensor


def targets(rows: int, offset: int, device) -> torch.Tensor:
    """Column of the positive pair of each anchor row: ``offset + i``."""
    return torch.arange(rows, device=device) + offset


def contrastive(image_rows, text_rows, image_all, text_all, scale, offset: int) -> torch.Tensor:
    """The CLIP loss (CE(t C) + CE(t C^T)) / 2 for anchor rows against gathered columns."""
    labels = targets(image_rows.shape[0], offset, image_rows.device)
    per_image = scale * image_rows @ text_all.T
    per_text = scale * text_rows @ image_all.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def as_scale(logit_scale, dtype, device) -> torch.Tensor:
    """OpenCLIP hands the loss ``logit_scale.exp()`` (t itself, a 0-d tensor); accept a number too."""
    if not isinstance(logit_scale, torch.Tensor):
        return torch.tensor(float(logit_scale), dtype=dtype, device=device)
    return logit_scale.to(dtype=dtype).reshape(())


class AlignLoss(nn.Module):
    """Base: distributed configuration, name, options, and the ``output_dict`` convention of OpenCLIP's losses.

    ``options`` maps each hyperparameter keyword of the constructor to its help text (or an
    :class:`~openclip_align.losses.options.Option`); its flags and its construction from the trainer's
    arguments follow from that (see :mod:`openclip_align.losses.options`).
    """

    loss_name = "?"
    options: Dict[str, Union[str, Option]] = {}

    def __init__(self, dist: Optional[DistributedConfig] = None):
        super().__init__()
        self.dist = dist or DistributedConfig()

    @classmethod
    def add_args(cls, group) -> None:
        """Add the loss's ``--LOSS-PARAM`` flags to an argparse group."""
        add_flags(cls, group)

    @classmethod
    def from_args(cls, args, **context):
        """The loss built from the trainer's parsed arguments (``context``: ``num_samples``)."""
        return cls(**constructor_kwargs(cls, args, context))

    @staticmethod
    def _finish(terms: Dict[str, torch.Tensor], output_dict: bool):
        # keys end in "_loss"; the trainer sums the values, so there is no total key
        return terms if output_dict else sum(terms.values())


def log_moving_average(log_old: torch.Tensor, log_new: torch.Tensor, gamma: float,
                       first: torch.Tensor) -> torch.Tensor:
    """log of ``(1 - gamma) * exp(log_old) + gamma * exp(log_new)``; ``log_new`` where ``first`` is true.

    Keeping a moving average of exponentials in the log domain is the running-max shift taken to its
    limit: nothing is ever exponentiated, so temperatures like 0.01 cannot overflow.
    """
    log_old = log_old.to(log_new.dtype)
    if gamma >= 1.0:
        mixed = log_new
    else:
        mixed = torch.logaddexp(log_old + math.log1p(-gamma), log_new + math.log(gamma))
    return torch.where(first, log_new, mixed)


def check_rate(loss_name: str, flag: str, gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"--loss {loss_name}: {flag} (moving-average rate) must lie in (0, 1], got {gamma}")
    return gamma


def check_positive(loss_name: str, flag: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"--loss {loss_name}: {flag} must be positive, got {value}")
    return value
