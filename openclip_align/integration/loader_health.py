"""A training loader that cannot deliver batches stops the run and says why: never a hang, never exit 0.

Upstream's webdataset pipeline hands every read error to its logging handler: a shard that cannot be
opened or a sample that cannot be decoded is logged and skipped. That is right for one bad shard among
thousands and wrong when the cause is the process itself. With its file descriptors exhausted (errno
EMFILE) every open fails, and because a training pipeline repeats its pass over a worker's shards until
the epoch's batch count is reached (``with_epoch``), a pass that makes no batch repeats forever: the run
hangs while the log grows by millions of warnings. When the loader gives up instead, upstream's epoch
ends after zero steps and the run exits 0 having trained nothing. Here:

* :class:`StopOnFatal` replaces the handler while the pipelines are built (:mod:`.trainer_adapter` swaps
  it in): descriptor exhaustion raises :class:`LoaderFailure` naming the limit and ``ulimit -n``; every
  other error is upstream's to skip;
* :class:`FullPassGuard` raises when one whole pass over a worker's shards makes no batch;
* :class:`ReadingShards` raises when a worker draws shard after shard and none gives a sample: a resampled
  stream (``--dataset-resampled``) never ends its pass, so a pool of shards that all fail would otherwise
  keep it drawing forever;
* :class:`CountingLoader` counts an epoch's batches in the main process, names descriptor exhaustion met
  while receiving a batch, and :func:`check_trained` refuses an epoch that got no batch.
"""
from __future__ import annotations

import errno
import logging
import os
import resource

from openclip_align.errors import UserInputError

_FD_ERRNOS = (errno.EMFILE, errno.ENFILE)
_FD_TEXTS = ("Too many open files", "received 0 items of ancdata")     # the OS's words; torch's on a failed fd pass


class LoaderFailure(UserInputError):
    """The training loader cannot deliver batches (one line; crosses from a dataloader worker by its message)."""


def is_fd_exhaustion(exc: BaseException) -> bool:
    """The process (or system) ran out of file descriptors; a worker's error re-raised in the main process
    keeps only its text, so the text counts too."""
    if isinstance(exc, OSError) and exc.errno in _FD_ERRNOS:
        return True
    return any(text in str(exc) for text in _FD_TEXTS)


def fd_message(where: str) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    target = max(65536, 4 * soft) if hard == resource.RLIM_INFINITY else min(hard, max(65536, 4 * soft))
    raise_it = (f"raise it before starting the run (`ulimit -n {target}`; the hard limit is {ceiling})"
                if target > soft else f"the hard limit is {ceiling} too: ask for a higher one (limits.conf, or "
                                      "LimitNOFILE= / the job scheduler's setting)")
    return (f"{where}: out of file descriptors (\"Too many open files\"): a process may open {soft} files "
            f"(`ulimit -n` is {soft}); {raise_it}, or pass fewer --workers")


class StopOnFatal:
    """Webdataset error handler: descriptor exhaustion stops the run, anything else goes to ``upstream``."""

    def __init__(self, upstream):
        self.upstream = upstream

    def __call__(self, exc: BaseException) -> bool:
        if is_fd_exhaustion(exc):
            raise LoaderFailure(fd_message(_shard_named(exc))) from exc
        return self.upstream(exc)


def _shard_named(exc: BaseException) -> str:
    """The shard webdataset appended to the error's arguments (after errno and message), else its file."""
    extra = [arg for arg in exc.args[2:] if isinstance(arg, str)]
    if extra:
        return f"reading {extra[-1]}"
    name = getattr(exc, "filename", None)
    return f"opening {name}" if name else "reading a training shard"


class FullPassGuard:
    """A training pipeline's ``batched`` stage (partial batches dropped) that raises when a whole pass over
    the worker's samples made no batch: upstream's ``with_epoch`` would start the same pass again, forever.
    A resampled stream never ends its pass, so the guard never fires there."""

    def __init__(self, stage, batch_size: int):
        self.stage, self.batch_size = stage, batch_size

    def __call__(self, data):
        seen = [0]

        def counted():
            for sample in data:
                seen[0] += 1
                yield sample

        made = 0
        for batch in self.stage(counted()):
            check_fd_headroom(batch)
            made += 1
            yield batch
        if made == 0:
            raise LoaderFailure(_no_batch_message(seen[0], self.batch_size))


MIN_FRUITLESS_DRAWS = 64     # (1/2)^64: a pool where half the shards fail never trips it by chance


class ReadingShards:
    """Upstream's training shard reader (the adapter hands it in) with a count of the shards drawn
    since its last sample: past twice the distinct shards drawn so far (at least :data:`MIN_FRUITLESS_DRAWS`)
    it raises. Only a pool in which (nearly) every shard fails gets there: one good shard in it resets the
    count. A pass over a fixed shard list draws each shard once, so it never gets there (the pass guard
    speaks there); a resampled stream draws with replacement and never ends. A class, so workers pickle it."""

    def __init__(self, upstream_reader, handler):
        self.upstream_reader, self.handler = upstream_reader, handler

    def __call__(self, shards):
        fruitless, seen = [0], set()

        def drawn():
            for shard in shards:
                fruitless[0] += 1
                seen.add(shard.get("url") if isinstance(shard, dict) else shard)
                if fruitless[0] > max(MIN_FRUITLESS_DRAWS, 2 * len(seen)):
                    raise LoaderFailure(_nothing_read_message(fruitless[0] - 1, len(seen)))
                yield shard

        for sample in self.upstream_reader(drawn(), handler=self.handler):
            fruitless[0] = 0
            yield sample


def _worker_name(default: str = "the training loader") -> str:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return f"training loader worker {info.id} of {info.num_workers}" if info is not None else default


def _nothing_read_message(draws: int, distinct: int) -> str:
    return (f"{_worker_name()}: the last {draws} shards it drew ({distinct} different ones) gave no sample: every "
            "one failed to open or read (the warnings above name the error); check --train-data and that this "
            "machine can read the shards")


def _tensors(batch) -> int:
    import torch

    parts = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    count = 0
    for part in parts:
        if isinstance(part, torch.Tensor):
            count += 1
        elif isinstance(part, (list, tuple, dict)):
            count += _tensors(part)
    return count


def check_fd_headroom(batch) -> None:
    """In a loader worker, before a batch is handed on: each of its tensors crosses to the main process as
    a shared-memory file plus a duplicate descriptor, opened by a background thread whose failure only
    prints, and the batch is lost: the main process then waits for it forever. Stop here instead, naming
    the limit, when the descriptors already open plus two per tensor exceed it (Linux: ``/proc/self/fd``)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:            # no worker: nothing crosses a process boundary
        return
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * _tensors(batch)
    if soft != resource.RLIM_INFINITY and open_now + needed > soft:
        raise LoaderFailure(fd_message(f"a training loader worker holding {open_now} open files cannot hand on a "
                                       f"batch of {needed // 2} tensors"))


def _no_batch_message(samples: int, batch_size: int) -> str:
    who = _worker_name()
    if samples == 0:
        return (f"{who}: no sample of its shards could be read (every one failed to open or decode; the warnings "
                "above name the error); check --train-data and that this machine can read the shards")
    return (f"{who}: a whole pass over its shards gave {samples} samples, fewer than one batch of --batch-size "
            f"{batch_size}; give each worker more samples (fewer --workers, more shards) or lower --batch-size")


class CountingLoader:
    """Stands in for the training dataloader during one epoch: counts the batches it yields and names
    descriptor exhaustion met while starting workers or receiving a batch."""

    def __init__(self, loader):
        self.inner = loader
        self.batches = 0

    def __getattr__(self, name):              # num_batches, num_samples, sampler, ...
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        try:
            iterator = iter(self.inner)
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                self.batches += 1
                yield batch
        except LoaderFailure:
            raise
        except Exception as exc:
            if is_fd_exhaustion(exc):
                raise LoaderFailure(fd_message("the training data loader")) from exc
            raise


def check_trained(loader: CountingLoader, epoch: int) -> None:
    """An epoch that got no batch trained nothing: stop before its evaluation and checkpoint. One that got
    fewer than it should lost some (a worker that cannot pass a batch to the main process drops it).

    Decided by each rank alone, on purpose: a rank that got batches is inside DDP's gradient all-reduce
    waiting for this one, so a collective here would be matched against that all-reduce. This rank exits
    non-zero instead; torchrun's agent then ends the others (gloo peers also see the connection close).
    Ranks that all got no batch (the usual case: the same limit everywhere) each stop here by themselves."""
    expected = getattr(loader.inner, "num_batches", None)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    why = (f"its warnings above say why (a worker skips a shard it cannot open or decode, and drops a batch it "
           f"cannot pass on; \"Too many open files\" there means raising `ulimit -n`, now {soft})")
    if not loader.batches:
        wanted = f" (it should give {expected})" if expected else ""
        raise LoaderFailure(f"epoch {epoch}: the training data loader gave no batch{wanted}, so nothing was "
                            f"trained and no checkpoint is written; {why}")
    if isinstance(expected, int) and loader.batches < expected:
        logging.warning("openclip-align: epoch %d: the training data loader gave %d of its %d batches; %s",
                        epoch, loader.batches, expected, why)
