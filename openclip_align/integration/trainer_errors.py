"""Mistakes in a trainer command line end in one clear line, not a traceback.

Inside ``python -m open_clip_train.main`` a misspelled ``--model``, a ``--train-data`` file that is not there
or a ``--pretrained`` checkpoint of another architecture used to end in a 10-20 frame traceback from
pandas or ``load_state_dict``. The plugin checks what it can right after the arguments are parsed
(before anything is built) and installs an exception hook that prints errors marked
:class:`UserInputError` as ``open_clip_train.main: error: ...``. ``OPENCLIP_ALIGN_TRACEBACK=1`` brings
the full traceback back. In a distributed run the hook also tells the other ranks why this one stops
(:mod:`.rank_agreement`), so they end at once with the cause in their logs.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys

from openclip_align.errors import UserInputError  # noqa: F401  (raised here, imported by tests)

TRACEBACK_SWITCH = "OPENCLIP_ALIGN_TRACEBACK"
_INSTALLED = "__openclip_align_excepthook__"
REMOTE_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")      # shards the trainer streams, not local files


def is_user_facing(exc: BaseException) -> bool:
    """Marked as such: every :class:`openclip_align.errors.UserInputError`, the training-data problems of
    :mod:`openclip_align.data.errors` included."""
    return bool(getattr(exc, "user_facing", False))


def one_line(exc: BaseException) -> str:
    """The error's own message; a dataloader worker's error comes back as "Caught X in DataLoader worker
    process N. Original Traceback ...": keep only the original message, its last line."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line and not line[0].isspace()][-1]
    head, _, message = last.partition(": ")
    return message if message and " " not in head else last


def install_excepthook() -> None:
    """Print user-facing errors as one line (idempotent; other exceptions keep the previous hook)."""
    if getattr(sys.excepthook, _INSTALLED, False):
        return
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        try:
            _show(exc_type, exc, tb)
        finally:
            if not getattr(exc, "shared", False):           # the other ranks stop too, naming this cause
                from .rank_agreement import announce_failure

                announce_failure(f"{exc_type.__name__}: {one_line(exc)}"[:2000])

    def _show(exc_type, exc, tb):
        if not is_user_facing(exc) or os.environ.get(TRACEBACK_SWITCH, "").strip() not in ("", "0"):
            return previous(exc_type, exc, tb)
        line = f"open_clip_train.main: error: {one_line(exc)}"
        for handler in logging.getLogger().handlers:        # the run's out.log, when it exists already
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.ERROR, "levelname": "ERROR"}))
        print(f"{line}\n(set {TRACEBACK_SWITCH}=1 to see the traceback)", file=sys.stderr)

    setattr(excepthook, _INSTALLED, True)
    sys.excepthook = excepthook


# --- checks on the parsed arguments, before anything is built ------------------------------------
def check_trainer_inputs(args, expand) -> None:
    """Refuse, with the flag and the fix named, inputs upstream would only fail on later and less clearly.

    Runs on every rank before distributed init. A run of one process checks every local data file here;
    in a run of several, each rank checks only the first file of each directory and the last one (a
    mistyped path or folder, on every rank at once), and every file is checked after distributed init
    by rank 0 alone, its finding shared (:func:`check_data_files_once`): 41k shards x 64 ranks of stat
    calls on a shared filesystem would otherwise precede step 1. ``expand(spec)`` is the trainer's own
    expansion of a data flag into (urls, weights)."""
    _check_model_name(getattr(args, "model", None))
    _check_pretrained(getattr(args, "model", None), getattr(args, "pretrained", None))
    every_file = _world_size() <= 1
    for flag in ("train_data", "val_data"):
        _check_data_files(f"--{flag.replace('_', '-')}", getattr(args, flag, None),
                          getattr(args, "dataset_type", "auto"), expand, every_file=every_file)


def check_data_files_once(args, expand) -> None:
    """After distributed init, on every rank: rank 0 checks every local data file, every rank raises what
    it found (a run of one process did this in :func:`check_trainer_inputs`)."""
    from . import rank_agreement

    if _world_size() <= 1:
        return
    problem = None
    if rank_agreement.rank() == 0:
        try:
            for flag in ("train_data", "val_data"):
                _check_data_files(f"--{flag.replace('_', '-')}", getattr(args, flag, None),
                                  getattr(args, "dataset_type", "auto"), expand)
        except UserInputError as err:
            problem = str(err)
    problem = rank_agreement.broadcast(problem)
    if problem is not None:
        error = UserInputError(problem)
        error.shared = True          # every rank raises it
        raise error


def _world_size() -> int:
    """The launcher's world size, as upstream reads it before distributed init."""
    from open_clip_train.distributed import world_info_from_env

    return int(world_info_from_env()[2])


def _check_model_name(name) -> None:
    if not isinstance(name, str) or ":" in name:              # hf-hub:, local-dir: are resolved upstream
        return
    import open_clip

    known = open_clip.list_models()
    if name in known or name.replace("/", "-") in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models() for the names"
    raise UserInputError(f"--model {name}: no such OpenCLIP model config; {hint}")


def _check_pretrained(model, pretrained) -> None:
    if not pretrained or not isinstance(model, str) or ":" in model or os.path.isfile(pretrained):
        return
    import open_clip

    if open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained):
        return                                                 # a known tag (download is upstream's)
    tags = open_clip.list_pretrained_tags_by_model(model.replace("/", "-"))
    known = f"its tags are {', '.join(tags)}" if tags else "it has no pretrained tags"
    raise UserInputError(f"--pretrained {pretrained}: no such file, and not a pretrained tag of {model} ({known}); "
                         "pass the path of a checkpoint (e.g. logs/RUN/checkpoints/epoch_N.pt)")


def _local_files(spec: str, expand):
    """Local paths named by a data flag, expanded as the trainer expands them (``::``-joined sources, brace
    patterns); remote ones (``pipe:``, URLs) are the trainer's to open."""
    return [url for url in expand(spec)[0] if not REMOTE_URL.match(url)]


def _check_data_files(flag: str, spec, dataset_type: str, expand, every_file: bool = True) -> None:
    if not spec or dataset_type == "synthetic":
        return
    paths = _local_files(spec, expand)
    if not every_file:
        paths = _spot_checks(paths)
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserInputError(f"{flag} {spec}: {missing[0]}{more} does not exist; check the path "
                             "(relative paths are read from the current directory "
                             f"{os.getcwd()})")


def _spot_checks(paths):
    """The first path in each directory, and the last path: what a mistyped folder or pattern misses."""
    first = {}
    for path in paths:
        first.setdefault(os.path.dirname(path), path)
    return list(first.values()) + paths[-1:]


# --- errors upstream raises while building the model ---------------------------------------------
_SECTION = re.compile(r"(Missing key\(s\)|Unexpected key\(s\)) in state_dict: (.*?)(?:\.\s*$|\.\s*\n)", re.S | re.M)


class CheckpointMismatchError(UserInputError, RuntimeError):
    """A ``--pretrained`` checkpoint of another architecture (still a RuntimeError, as upstream raised)."""


def explain_checkpoint_mismatch(error: RuntimeError, model: str, pretrained: str) -> CheckpointMismatchError:
    """``load_state_dict``'s page-long message as one line: what does not fit, and what to do."""
    text = str(error)
    counts = {"missing": 0, "unexpected": 0}
    first = None
    for kind, keys in _SECTION.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        counts["missing" if kind.startswith("Missing") else "unexpected"] += len(names)
        first = first or (names[0] if names else None)
    shapes = re.findall(r"size mismatch for ([^:]+):", text)
    first = first or (shapes[0] if shapes else None)
    parts = [f"{counts['missing']} tensors missing", f"{counts['unexpected']} unexpected",
             f"{len(shapes)} of another shape"]
    return CheckpointMismatchError(
        f"--pretrained {pretrained} does not fit --model {model}: {', '.join(parts)} (first: {first}); "
        "pass the --model the checkpoint was trained with")
