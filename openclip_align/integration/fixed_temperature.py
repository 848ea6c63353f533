"""``--fixed-temperature T``: train at one temperature instead of learning it.

Mind the Gap (Liang et al., NeurIPS 2022) fine-tunes CLIP at fixed temperatures to show that a sharp
temperature keeps the modality gap open. With the flag the model's ``logit_scale`` is set to log(1/T) right
after the model is created (after ``--pretrained`` weights load, so it overrides the checkpoint's learned
scale) and excluded from training (``requires_grad=False``: upstream's optimizer takes only parameters that
require gradients). A resumed run loads the same constant back. Upstream clamps the logit scale to
[0, log 100] after every step, so T must lie in [0.01, 1].
"""
from __future__ import annotations

import logging
import math

import torch

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0      # upstream's clamp of logit_scale to [0, log 100]


def add_args(group) -> None:
    group.add_argument("--fixed-temperature", type=float, default=None, metavar="T",
                       help="train at temperature T: logit_scale is set to log(1/T) and not learned "
                            f"(T in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]; default: learned, as upstream)")


def check_args(parser, args) -> None:
    temperature = getattr(args, "fixed_temperature", None)
    if temperature is None:
        return
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        parser.error(f"--fixed-temperature {temperature}: must lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                     "because open_clip_train clamps the logit scale log(1/T) to [0, log 100] after every step")
    if getattr(args, "siglip", False):
        parser.error("--fixed-temperature sets CLIP's logit scale; --siglip has its own scale and bias")


def fix_logit_scale(model: torch.nn.Module, temperature: float) -> None:
    """logit_scale = log(1/T), frozen."""
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.nn.Parameter):
        raise TypeError(f"--fixed-temperature: {type(model).__name__} has no logit_scale parameter to fix")
    with torch.no_grad():
        scale.fill_(math.log(1.0 / temperature))
    scale.requires_grad_(False)


def apply(args, model: torch.nn.Module) -> bool:
    """Fix ``model``'s logit scale when the run asks for ``--fixed-temperature``; whether it did. Called with
    the first model a trainer run creates (the one it trains; a --distill teacher comes later)."""
    temperature = getattr(args, "fixed_temperature", None)
    if temperature is None:
        return False
    fix_logit_scale(model, temperature)
    logging.info("openclip-align: --fixed-temperature %g: logit_scale fixed at log(1/T) = %.4f, not learned",
                 temperature, math.log(1.0 / temperature))
    return True
