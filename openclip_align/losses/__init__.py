"""Losses for ``open_clip_train.main --loss NAME`` (see :mod:`openclip_align.losses.registry`)."""
from .registry import LOSS_MODULES, LOSSES, LossSpec, get_loss_spec, loss_names, register_loss

__all__ = ["LOSSES", "LossSpec", "get_loss_spec", "loss_names", "register_loss"]


def __getattr__(name):
    """``openclip_align.losses.IMSepLoss`` and the like: a loss class defined by one of the modules in
    ``LOSS_MODULES``, imported on first use so that ``import openclip_align.losses`` stays light."""
    if not name.startswith("_"):
        import importlib

        from ._common import AlignLoss

        for module_name in LOSS_MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            found = vars(module).get(name)
            if isinstance(found, type) and issubclass(found, AlignLoss) and found.__module__ == module.__name__:
                return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
