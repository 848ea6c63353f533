"""Resume a checkpoint on any number of ranks: one written by one process also resumes under DDP.

A checkpoint written by N > 1 ranks stores the DDP model's ``state_dict`` (keys ``module.*``); one
written by a single process stores the bare model's. Upstream's resume strips ``module.`` when the
new run is not distributed, but not the other way round, so a 1-process checkpoint cannot resume
under torchrun (``load_state_dict`` misses every ``module.*`` key). Upstream's checkpoint load (which
``main`` uses only to resume; wrapped by :func:`.trainer_adapter.patch_file_utils`) passes what it read
through :func:`ddp_keys`, which adds the prefix when the run is distributed with DDP and the checkpoint's
keys lack it; every other load is passed through unchanged. ``patches/open_clip-resume-any-world-size.patch``
is the upstream fix.
"""
from __future__ import annotations


def ddp_keys(checkpoint, distributed: bool):
    """``checkpoint`` with ``module.``-prefixed model keys when a DDP run resumes a 1-process train
    checkpoint (a dict with ``epoch`` and ``state_dict``); anything else is returned as it is."""
    if not distributed or not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return checkpoint
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state or next(iter(state)).startswith("module."):
        return checkpoint
    return {**checkpoint, "state_dict": {f"module.{key}": value for key, value in state.items()}}
