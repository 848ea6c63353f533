"""``sizes.json``: the sample count per shard that upstream sums for an epoch's size when
``--train-num-samples`` is absent. The one writer (:func:`write_sizes`) and the one check.

One rule for what a shard counts: the samples training takes from it (:func:`kept_samples`), that is
every sample but those with an empty or missing caption. Training never takes one of those: without
``--drop-empty-captions`` the run refuses them before step 1, with it the caption filter drops them. Counted,
they would make upstream's epoch longer than one pass over what is trained on (webdataset's
``with_epoch`` fills the difference by repeating samples, and the learning-rate schedule counts steps
for samples that never come), and the batch-per-worker check would count samples no worker gets. The
per-pair loss state is sized from the record's count of every sample instead (indices are numbered
over every sample), so it does not read this file when a record exists.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from openclip_align.atomic_files import atomic_write_json

from .errors import CorpusError
from .record import writable_dir

SIZES_FILE = "sizes.json"               # where upstream reads shard sizes


def kept_samples(entry: Mapping) -> int:
    """The rule: a shard's samples (its record entry's ``count``) less those with an empty caption."""
    return int(entry["count"]) - len(entry.get("empty_caption_keys") or ())


def sizes_path(folder) -> str:
    return os.path.join(str(folder), SIZES_FILE)


def write_sizes(folder, sizes: Mapping[str, int]) -> Path:
    """Write {``NAME.tar``: kept samples} beside the shards, atomically (sorted keys, so equal counts
    give equal bytes). Callers pass counts by :func:`kept_samples`."""
    return atomic_write_json(sizes_path(folder), dict(sizes))


def remove_sizes(folder) -> None:
    """Before shards are rewritten: an old ``sizes.json`` must not vouch for new shards."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sizes_path(folder))


def write_sizes_where_missing(paths: Sequence[str], entries: Mapping[str, dict]) -> None:
    """After a scan (``data check``, ``embed``): write ``sizes.json`` per shard folder where there is none,
    the folder is writable and every shard of it was scanned (``entries``: {path: record entry}). An
    existing one is checked by the trainer (:func:`check_sizes_file`), not replaced."""
    by_folder: Dict[str, List[str]] = {}
    for path in paths:                 # one pass: shards spread over many folders stay O(shards)
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    for folder, mine in sorted(by_folder.items()):
        if os.path.exists(sizes_path(folder)) or not writable_dir(folder) or any(p not in entries for p in mine):
            continue
        write_sizes(folder, {os.path.basename(p): kept_samples(entries[p]) for p in mine})


def read_sizes(folder) -> Optional[Dict[str, int]]:
    """{``NAME.tar``: samples} of the folder's ``sizes.json``; None when there is none."""
    path = sizes_path(folder)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def check_sizes_file(source: str, urls: Sequence[str], counts: Mapping[str, int]) -> None:
    """The ``sizes.json`` upstream reads claims no more samples than the shards hold."""
    path = sizes_path(os.path.dirname(urls[0]))
    claimed = read_sizes(os.path.dirname(urls[0]))
    if claimed is None:
        return
    fix = "delete it and rerun `openclip-align data check --data SHARDS` (it writes one where there is none), or " \
          "delete it and pass --train-num-samples"
    for url in urls:
        name = os.path.basename(url)
        if name not in claimed:
            raise CorpusError(f"{path} has no entry for the training shard {name}; {fix}")
        if int(claimed[name]) > counts[url]:
            raise CorpusError(f"{path} says {url} holds {claimed[name]} samples, but it holds {counts[url]}; upstream "
                              f"would wait forever for the missing ones: {fix}")
