"""Resume a checkpoint on any number of ranks: one written by one process also resumes under DDP.

A checkpoint written by N > 1 ranks stores the DDP model's ``state_dict`` (keys ``module.*``); one
written by a single process stores the bare model's. Upstream's resume strips ``module.`` when the
new run is not distributed, but not the other way round, so a 1-process checkpoint cannot resume
under torchrun (``load_state_dict`` misses every ``module.*`` key). Wrapping
``open_clip_train.file_utils.pt_load`` (which ``main`` imports by name, and uses only to resume) adds
the prefix when the run is distributed with DDP and the checkpoint's keys lack it; every other load is
passed through unchanged. ``patches/open_clip-resume-any-world-size.patch`` is the upstream fix.

The same wrapper makes the run's resume load the only one (see :func:`.checkpoints.load_once`): the
plugin takes its record (a stateful loss's per-sample state) from it instead of reading the file again.
"""
from __future__ import annotations

_FLAG = "__openclip_align_ddp_resume_patched__"


def ddp_keys(checkpoint, distributed: bool):
    """``checkpoint`` with ``module.``-prefixed model keys when a DDP run resumes a 1-process train
    checkpoint (a dict with ``epoch`` and ``state_dict``); anything else is returned as it is."""
    if not distributed or not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return checkpoint
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state or next(iter(state)).startswith("module."):
        return checkpoint
    return {**checkpoint, "state_dict": {f"module.{key}": value for key, value in state.items()}}


def patch_file_utils(file_utils_module) -> None:
    if getattr(file_utils_module, _FLAG, False):
        return
    setattr(file_utils_module, _FLAG, True)
    upstream = file_utils_module.pt_load

    def pt_load(file_path, map_location=None):
        from .checkpoints import load_once
        from .run_state import current_args

        args = current_args()
        if args is not None and getattr(args, "resume", None) and str(file_path) == str(args.resume):
            checkpoint = load_once(upstream, file_path, map_location=map_location)   # the run's resume
        else:
            checkpoint = upstream(file_path, map_location=map_location)
        distributed = bool(getattr(args, "distributed", False)) and not getattr(args, "horovod", False)
        return ddp_keys(checkpoint, distributed)

    pt_load.__wrapped__ = upstream
    file_utils_module.pt_load = pt_load
