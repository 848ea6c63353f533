"""The loss registry behind ``--loss NAME``.

Each loss module registers its class with :func:`register_loss`. The trainer integration reads the
registry to add ``--loss`` choices and per-loss flags, to check that the batch carries what the loss
needs (semantic embeddings, dataset indices, raw captions) before the first step, and to build the
loss from the parsed arguments.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional

# What a loss can ask the data pipeline for, besides image and text features.
NEEDS_SEMANTIC = "semantic"   # sentence-embedding of each pair's caption (precomputed or on the fly)
NEEDS_INDEX = "index"         # stable dataset index of each pair
KNOWN_NEEDS = frozenset({NEEDS_SEMANTIC, NEEDS_INDEX})


@dataclass(frozen=True)
class LossSpec:
    name: str
    cls: type
    help: str
    needs: FrozenSet[str] = field(default_factory=frozenset)
    stateful: bool = False        # has state that must survive --resume (saved in the checkpoint)
    raw_features: bool = False    # wants unnormalised embeddings (the trainer then skips L2-normalisation)


LOSSES: Dict[str, LossSpec] = {}


def register_loss(
    name: str, *, help: Optional[str] = None, needs=(), stateful: bool = False, raw_features: bool = False
) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as ``--loss name``.

    ``help`` is the loss's one-line description (``--loss`` choices, its flag group in the trainer's --help);
    by default the first paragraph of the class docstring, so the description is written once, where
    Python's own ``help()`` finds it too.

    The class must provide ``add_args(parser_group)`` (adds its flags with reference defaults) and
    ``from_args(args, **context)`` (class method, builds the loss from parsed trainer args); a subclass of
    ``AlignLoss`` derives both from its constructor and its ``options`` map (:mod:`.options`), checked here so
    that a declaration that does not match the constructor fails when the module is imported. The class's
    ``loss_name`` is set to ``name``.
    """
    unknown = set(needs) - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"loss {name!r}: unknown needs {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}")

    def decorate(cls: type) -> type:
        for attr in ("add_args", "from_args"):
            if not callable(getattr(cls, attr, None)):
                raise TypeError(f"loss {name!r}: {cls.__name__} must define {attr}()")
        existing = LOSSES.get(name)
        if existing is not None and existing.cls is not cls:
            raise ValueError(f"loss {name!r} is already registered by {existing.cls.__qualname__}")
        if cls.__dict__.get("loss_name", name) != name:
            raise ValueError(f"loss {name!r}: {cls.__qualname__}.loss_name says {cls.__dict__['loss_name']!r}")
        description = help or _first_paragraph(cls.__doc__)
        if not description:
            raise TypeError(f"loss {name!r}: give {cls.__name__} a docstring or register it with help=...")
        cls.loss_name = name          # the name written once, here: its flags and messages read it
        from .options import flags

        flags(cls)
        LOSSES[name] = LossSpec(name, cls, description, frozenset(needs), stateful, raw_features)
        return cls

    return decorate


def _first_paragraph(docstring: Optional[str]) -> str:
    return " ".join(inspect.cleandoc(docstring or "").split("\n\n")[0].split())


def get_loss_spec(name: str) -> LossSpec:
    _load_builtin_losses()
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; valid names: {', '.join(loss_names())}") from None


def loss_names():
    """All valid ``--loss`` values; ``clip`` (upstream OpenCLIP's own loss) comes first."""
    _load_builtin_losses()
    return ["clip"] + sorted(n for n in LOSSES if n != "clip")


# The modules of this package that define losses: the one list (the package's lazy class attributes read it
# too). A module listed here that cannot be imported is an error, never skipped.
LOSS_MODULES = ("imsep", "refine", "sogclr", "cyclip", "vicreg", "onlineclr")


def _load_builtin_losses() -> None:
    for module in LOSS_MODULES:
        importlib.import_module(f"{__package__}.{module}")
