"""A loss's command-line options, declared once and read from there.

A loss declares each hyperparameter as a keyword of its constructor (name, default, type annotation) and
gives its help text in the class's ``options`` map, keyword -> help (a string, or an :class:`Option` where
the flag is spelled otherwise or needs a metavar). From that follow:

* its flag, ``--{loss_name}-{keyword}`` with ``-`` for ``_``, in the map's order (:func:`add_flags`):
  ``type`` from the annotation (``Optional[T]`` gives ``T``), a ``bool`` as a ``--flag/--no-flag`` switch,
  the help text ending in ``(default: ...)``;
* the argparse dests a checkpoint records with their values (:func:`flag_dests`);
* the constructor keywords read back from parsed arguments (:func:`constructor_kwargs`).

Keywords that are not options come from the trainer, never from a flag of the loss (``TRAINER_KEYWORDS``):
``dist`` (rank, world size, ``--local-loss``, ``--gather-with-grad``), ``accum_freq`` (upstream's
``--accum-freq``) and ``num_samples`` (the training set size, which the trainer reads from the data). A
loss whose flag means something the constructor cannot know (``--rafa-seed`` defaults to the run's
``--seed``) declares the flag's own default in its :class:`Option` and says the rule in its ``from_args``.
"""
from __future__ import annotations

import argparse
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .distributed import DistributedConfig

_CONSTRUCTOR = object()   # Option.default: the constructor's own default
_TYPES = (float, int, bool, str)


@dataclass(frozen=True)
class Option:
    """How one constructor keyword of a loss appears on the command line, where a plain help text is not enough."""

    help: str
    flag: Optional[str] = None            # default: --{loss_name}-{keyword with - for _}
    metavar: Optional[str] = None
    default: Any = _CONSTRUCTOR           # the flag's default where it differs from the constructor's
    default_text: Optional[str] = None    # what "(default: ...)" says; default: the value (on / off for a switch)


@dataclass(frozen=True)
class Flag:
    """One option as argparse sees it, resolved from the declaration."""

    keyword: str
    flag: str
    dest: str
    type: type
    default: Any
    help: str
    metavar: Optional[str]


def flags(cls) -> List[Flag]:
    """The flags of loss class ``cls``, in the order of its ``options``; a declaration that does not match the
    constructor (unknown keyword, no default, no plain type) raises TypeError."""
    init = cls.__init__
    params = inspect.signature(init).parameters
    hints = typing.get_type_hints(init)
    out = []
    for keyword, option in getattr(cls, "options", {}).items():
        option = Option(option) if isinstance(option, str) else option
        where = f"loss {cls.loss_name!r}: option {keyword!r}"
        if keyword not in params or keyword in TRAINER_KEYWORDS:
            raise TypeError(f"{where} is not a hyperparameter keyword of {cls.__qualname__}.__init__")
        default = params[keyword].default if option.default is _CONSTRUCTOR else option.default
        if default is inspect.Parameter.empty:
            raise TypeError(f"{where} has no default in {cls.__qualname__}.__init__")
        kind = _plain_type(hints.get(keyword))
        if kind is None:
            raise TypeError(f"{where} needs one of the annotations {[t.__name__ for t in _TYPES]} (or Optional)")
        flag = option.flag or f"--{cls.loss_name}-{keyword.replace('_', '-')}"
        shown = option.default_text or (("on" if default else "off") if kind is bool else str(default))
        out.append(Flag(keyword, flag, flag[2:].replace("-", "_"), kind, default,
                        f"{option.help} (default: {shown})", option.metavar))
    return out


def _plain_type(hint) -> Optional[type]:
    if typing.get_origin(hint) is typing.Union:
        inner = [t for t in typing.get_args(hint) if t is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if hint in _TYPES else None


def add_flags(cls, group) -> None:
    for f in flags(cls):
        if f.type is bool:
            group.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.help)
        else:
            group.add_argument(f.flag, type=f.type, default=f.default, help=f.help, metavar=f.metavar)


def flag_dests(cls) -> List[str]:
    """The argparse dests of the loss's flags (recorded in checkpoints with their values)."""
    return [f.dest for f in flags(cls)]


def _dist(cls, args, context):
    return DistributedConfig.from_args(args, cls.loss_name)


def _accum_freq(cls, args, context):
    return getattr(args, "accum_freq", 1) or 1


def _num_samples(cls, args, context):
    return context.get("num_samples")


# constructor keyword -> how the trainer's arguments give it (never a flag of the loss)
TRAINER_KEYWORDS = {"dist": _dist, "accum_freq": _accum_freq, "num_samples": _num_samples}


def constructor_kwargs(cls, args, context: Dict[str, Any]) -> Dict[str, Any]:
    """The keywords for ``cls(...)``: each option from its flag (its default when ``args`` lacks it), and the
    trainer's keywords the constructor takes."""
    kwargs = {f.keyword: getattr(args, f.dest, f.default) for f in flags(cls)}
    params = inspect.signature(cls.__init__).parameters
    for keyword, read in TRAINER_KEYWORDS.items():
        if keyword in params:
            kwargs[keyword] = read(cls, args, context)
    return kwargs
