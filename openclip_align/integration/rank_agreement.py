"""Every rank of a distributed trainer run takes the same decision, or every rank stops naming the cause.

Two tools, for two kinds of moments:

* :func:`agree` at a point that every rank reaches (the model's creation, the end of an epoch, a log
  step): each rank passes what it found (None: nothing wrong), the findings are exchanged in one
  collective, and every rank raises the same error naming the rank(s) and their causes. No rank goes
  on into the next collective while another has stopped.
* :func:`announce_failure` / :func:`watch_for_failures` for a failure that only one rank meets,
  anywhere (a save on rank 0, a data error in one rank's loader): the failing rank writes its one-line
  cause into the run's rendezvous store before it exits, and a daemon thread on every rank polls that
  store and ends its process with the cause in its log, instead of waiting in a collective until the
  NCCL/gloo timeout (30 minutes by default).

Outside a distributed run both reduce to the local behaviour (raise the local error; do nothing).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import List, Optional, Sequence

FAILURE_KEY = "openclip_align/failure"
POLL_SECONDS = 1.0
GRACE_SECONDS = 3 * POLL_SECONDS        # the failing rank waits this long so that the others read its cause
_WATCHING = {"thread": None}
_WATCH_ENDS = threading.Event()          # set at a normal interpreter exit


class RankDisagreement(RuntimeError):
    """Raised on every rank when :func:`agree` found a problem on at least one of them."""

    shared = True           # every rank raises it: nothing to announce to the others


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:      # pragma: no cover - torch always has it
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if _distributed():
        import torch.distributed as dist

        return dist.get_rank()
    return 0


def gather(value) -> List[object]:
    """``value`` of every rank, in rank order (``[value]`` outside a distributed run)."""
    if not _distributed():
        return [value]
    import torch.distributed as dist

    values: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank."""
    if not _distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def describe(problems: Sequence[Optional[str]]) -> Optional[str]:
    """None when no rank found a problem, else ``rank R: cause`` for each rank that did."""
    found = [(r, p) for r, p in enumerate(problems) if p]
    if not found:
        return None
    if len(problems) == 1:
        return found[0][1]
    return "; ".join(f"rank {r}: {p}" for r, p in found)


def agree(problem: Optional[str], error=RankDisagreement) -> None:
    """Call on every rank at the same point: raise ``error`` on all of them if any rank's ``problem`` is set.

    The message names each rank that found a problem and its cause, and is logged before it is raised,
    so that every rank's log says why the run stopped.
    """
    message = describe(gather(problem))
    if message is None:
        return
    if _distributed():
        message = f"stopping on every rank: {message}"
        logging.error("openclip-align: %s", message)
    exc = error(message)
    exc.shared = True
    raise exc


# --- failures met by one rank only --------------------------------------------------------------------
def _store():
    """The run's rendezvous store (the one ``init_process_group`` joined), or None."""
    if not _distributed():
        return None
    from torch.distributed import distributed_c10d

    getter = getattr(distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except Exception:  # no default store (another init method): fall back to the collectives alone
        return None


def announce_failure(message: str, grace: float = GRACE_SECONDS) -> bool:
    """Tell the other ranks why this rank stops (first cause wins); True if it was announced."""
    store = _store()
    if store is None:
        return False
    try:
        if store.check([FAILURE_KEY]):
            return False
        store.set(FAILURE_KEY, f"rank {rank()}: {message}")
    except Exception:  # the store is gone: the run is ending anyway
        return False
    time.sleep(grace)
    return True


def watch_for_failures(poll: float = POLL_SECONDS) -> None:
    """Start (once per process) the thread that ends this rank when another rank announced a failure."""
    store = _store()
    if store is None or _WATCHING["thread"] is not None:
        return
    me = rank()

    def watch():
        while not _WATCH_ENDS.wait(poll):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                cause = store.get(FAILURE_KEY).decode("utf-8", "replace")
            except Exception:  # the store went away (the run ended): nothing more to hear
                return
            if cause.startswith(f"rank {me}:"):
                return          # our own announcement: the main thread is already stopping
            _stop(f"openclip-align: stopping rank {me}: {cause}")

    thread = threading.Thread(target=watch, name="openclip-align-failure-watch", daemon=True)
    _WATCHING["thread"] = thread
    thread.start()
    atexit.register(_end_watch, thread, poll)


def _end_watch(thread: threading.Thread, poll: float) -> None:
    """At a normal exit, let the watcher leave its loop before the interpreter tears the store down: a daemon
    thread still inside a store call at that moment can abort the process after a run that succeeded."""
    _WATCH_ENDS.set()
    thread.join(timeout=poll + 5)


def _stop(line: str) -> None:
    """Log ``line`` everywhere this rank logs to, then end the process (the main thread may be blocked in
    a collective that would only return at the timeout)."""
    if logging.getLogger().handlers:
        logging.error(line)
    else:
        print(line, file=sys.stderr)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # a closed handler: nothing to flush
            pass
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
