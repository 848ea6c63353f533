"""A pair's dataset index and the dataset size that bounds it.

Losses that keep per-sample state (SogCLR's moving averages) have one slot per training pair, addressed
by the pair's dataset index: every index must lie in [0, N), N the number of distinct training pairs.
:func:`outside` is that one rule, used by the record check of shards before step 1, by the csv check
and by each shard sample as it is decoded; :func:`dataset_size` is the one N.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .errors import MissingExtrasError

FIX_NUMBERING = "Number the pairs 0..N-1"
FIX_CSV_NUMBERING = f"{FIX_NUMBERING} (or drop the index column of a csv to use the row numbers)"


def outside(low: int, high: int, total: int) -> Optional[int]:
    """The first of ``low`` (the smallest index) and ``high`` (the largest) outside [0, total), else None."""
    if low < 0:
        return low
    if high >= total:
        return high
    return None


def check_index_range(where: str, indices, total: int, fix: str = FIX_NUMBERING,
                      error: type = MissingExtrasError) -> None:
    """Every index of ``indices`` (one int, or an array) lies in [0, ``total``); else ``error`` naming the
    first one outside, the slots it addresses and ``fix``."""
    if isinstance(indices, (int, np.integer)):
        low = high = int(indices)
    else:
        indices = np.asarray(indices)
        if indices.size == 0:
            return
        low, high = int(indices.min()), int(indices.max())
    bad = outside(low, high, total)
    if bad is not None:
        raise error(f"{where}: dataset index {bad} is outside [0, {total}); a loss that keeps per-sample state "
                    f"has one slot per training pair ({total}), addressed by this index. {fix}")


def dataset_size(train_data: str, source_size: Callable, dataset=None) -> Optional[int]:
    """Number of distinct training pairs. A map-style dataset (a csv): its length, one row per pair.
    Shards: the sum over a ``::`` mixture's sources, each from ``source_size(source)`` (upstream's reader of
    the source's own folder's sizes file / __len__, returning ``(samples, shards)``; it looks only in the
    first shard's folder, so a second source elsewhere had no size); None when a source has none (a loss
    that needs the size says so when it is built)."""
    if dataset is not None and not _iterable(dataset):
        return len(dataset)
    total = 0
    for source in str(train_data).split("::"):
        try:
            size, _ = source_size(source)
        except Exception:  # noqa: BLE001 - a size file that does not list these shards: no size
            return None
        if size is None:
            return None
        total += int(size)
    return total


def _iterable(dataset) -> bool:
    import torch

    return isinstance(dataset, torch.utils.data.IterableDataset)
