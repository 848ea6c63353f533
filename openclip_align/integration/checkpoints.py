"""Checkpoints of a trainer run: written atomically, never of a diverged model, resumed from a readable one.

Upstream's ``main`` writes ``epoch_N.pt`` with ``torch.save(checkpoint, path)`` straight onto the final
name, so a process killed mid-write leaves a truncated file that ``--resume latest`` then picks and dies
on. ``main`` may run as ``__main__`` (``python -m open_clip_train.main``), where no import hook can reach
its globals, but it always calls ``torch.save`` through the ``torch`` module. So, from the moment
``open_clip_train.params`` is imported (see ``_activation.py``), ``torch.save`` is wrapped once
(:func:`.trainer_adapter.patch_torch_save`):

* a save whose target lies in the current trainer run's checkpoint folder (``args.checkpoint_path``)
  first checks that the weights in the checkpoint are finite (one device sync per save), then goes
  through :func:`openclip_align.atomic_files.atomic_open` (temporary sibling ``NAME.tmp-PID``, fsync,
  rename). Temporaries left by a killed run are removed by the next save;
* every other call (outside a trainer run, or to any other path) reaches torch's own ``save`` unchanged.

``--resume latest``: upstream picks the newest ``*.pt`` by name. When the model is created (the first
plugin hook after that choice, before upstream loads it), :func:`fall_back_from_unreadable` tries the
chosen file; if it cannot be read, a warning names it and the newest readable checkpoint of the folder
is used instead. Nothing is deleted.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import List, Optional

from openclip_align.atomic_files import atomic_open, stale_temps

from . import rank_agreement


# --- saving ---------------------------------------------------------------------------------------
def is_in_folder(f, folder) -> bool:
    """Whether ``f`` (what ``torch.save`` was given) is a file directly inside the run's checkpoint folder."""
    if not folder or not isinstance(f, (str, os.PathLike)):
        return False
    return os.path.abspath(os.path.dirname(os.fspath(f))) == os.path.abspath(folder)


def save_checkpoint(obj, path: Path, torch_save, *args, **kwargs) -> None:
    """Refuse non-finite weights, then write ``path`` atomically with ``torch_save``."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict):
        bad = non_finite_tensors(state)
        if bad:
            epoch = obj.get("epoch") if isinstance(obj, dict) else None
            raise FloatingPointError(f"not writing {path}: {diverged_weights(bad, epoch)}")
    for stale in stale_temps(path.parent, "*.pt"):
        logging.info("openclip-align: removing %s, left by an interrupted checkpoint save", stale)
        stale.unlink(missing_ok=True)
    with atomic_open(path, "wb") as fh:
        torch_save(obj, fh, *args, **kwargs)


def diverged_weights(bad: List[str], epoch: Optional[int] = None) -> str:
    """What to say of weights ``bad`` (names from :func:`non_finite_tensors`) after ``epoch``: one text for the
    check after each epoch and the check before each save."""
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"the model's weights{f' after epoch {epoch}' if epoch else ''} hold NaN/inf values ({shown}); the "
            "training diverged. No checkpoint of the diverged model is written and the checkpoints already written "
            "stay as they are. Try a lower --lr or --precision fp32.")


def non_finite_tensors(state: dict) -> List[str]:
    """Names of the floating point tensors holding a NaN/inf (one host read per device)."""
    import torch

    names, flags = [], {}
    for name, value in state.items():
        if name.rsplit(".", 1)[-1] == "attn_mask":   # additive causal masks hold -inf by design; a scripted
            continue                                 # model (--torchscript) saves them with its weights
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            names.append(name)
            flags.setdefault(value.device, []).append((len(names) - 1, torch.isfinite(value).all()))
    finite = [True] * len(names)
    for items in flags.values():
        values = torch.stack([flag for _, flag in items]).tolist()
        for (position, _), ok in zip(items, values):
            finite[position] = ok
    return [name for name, ok in zip(names, finite) if not ok]


# --- resuming -------------------------------------------------------------------------------------
def fall_back_from_unreadable(args, resume_latest: bool) -> None:
    """After ``--resume latest`` chose ``args.resume``: keep it if every rank can read it, else the newest
    checkpoint that every rank can read (rank 0's list of the folder decides the order). Each rank tries
    each candidate itself (a node may see a truncated copy others do not); the findings are exchanged, so
    every rank resumes from the same file, or every rank stops with each rank's reason."""
    chosen = getattr(args, "resume", None)
    if not resume_latest or not chosen or "://" in str(chosen):
        return
    folder = os.path.dirname(chosen)
    candidates = rank_agreement.broadcast(
        [chosen] + [c for c in newest_first(folder) if os.path.abspath(c) != os.path.abspath(chosen)])
    skipped = []
    for candidate in candidates:
        problem = rank_agreement.describe(rank_agreement.gather(_problem_reading(candidate)))
        if problem is None:
            if candidate != chosen:
                logging.warning("openclip-align: --resume latest: resuming from %s instead", candidate)
                args.resume = candidate
            return
        logging.warning("openclip-align: --resume latest: skipping %s, which cannot be read (%s)%s", candidate,
                        problem, "; it may be a checkpoint whose writing was interrupted" if not skipped else "")
        skipped.append(f"{candidate} ({problem})")
    error = RuntimeError(
        "--resume latest: no checkpoint in " + folder + " can be read: " + "; ".join(skipped)
        + ". Move the unreadable files away and start again without --resume, or pass --resume PATH of a "
        "good copy.")
    error.shared = True            # every rank raises it
    raise error


def _problem_reading(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return "no such file"
    return unreadable(path)


def newest_first(folder: str) -> List[str]:
    """``*.pt`` files of ``folder``, the one upstream's ``--resume latest`` would pick first (numbers in
    names compared as numbers)."""
    def key(path: str):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.lower())]

    return sorted(glob.glob(os.path.join(folder, "*.pt")), key=key, reverse=True)


def unreadable(path: str) -> Optional[str]:
    """None if torch can open the checkpoint (with upstream resume's defaults), else why not. Zip checkpoints (torch's default format) are
    opened memory-mapped, so the tensors are not read; a truncated file fails on its missing directory."""
    import torch

    try:
        if zipfile.is_zipfile(path):
            torch.load(path, map_location="cpu", mmap=True)
        else:
            torch.load(path, map_location="cpu")
    except Exception as err:  # any failure to read is a reason to skip it
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


# --- read once per rank -------------------------------------------------------------------------------
PLUGIN_KEY = "openclip_align"        # the plugin's record inside checkpoint["optimizer"]
NOT_LOADED = object()                 # no resume load of the path happened (yet) in this run


def load_once(upstream_load, path, map_location=None):
    """Upstream's resume load, read once for upstream and the plugin alike: (checkpoint, plugin record).

    A local checkpoint in torch's zip format is memory-mapped: tensors are read from the page cache when
    they are used (the model's weights when upstream copies them in; the loss state when the loss adopts
    it), never held twice in anonymous memory. The plugin's record is taken out of the optimizer state
    (the optimizer does not want it) and returned beside the checkpoint (None: it has none), for the run
    to keep until the loss state is restored (:func:`.loss_state.restore_loss_state`).
    """
    import torch

    local = isinstance(path, (str, os.PathLike)) and "://" not in str(path) and os.path.isfile(path)
    if local and zipfile.is_zipfile(path):
        checkpoint = torch.load(path, map_location=map_location, mmap=True)
    else:
        checkpoint = upstream_load(path, map_location=map_location)
    optimizer = checkpoint.get("optimizer") if isinstance(checkpoint, dict) else None
    record = optimizer.pop(PLUGIN_KEY, None) if isinstance(optimizer, dict) else None
    return checkpoint, record
