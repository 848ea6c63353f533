"""A run's webdataset shards: their record checked once per run, every sample checked as it is decoded.

Nothing here reads a shard before step 1. What can be known per shard (counts, empty captions, index
ranges, the embedding column's width and completeness, the sizes file, a batch per worker) comes from the
record that ``data build`` / ``embed`` / ``data check`` wrote beside the shards, verified by
:func:`openclip_align.data.preflight.verify_record` in time proportional to the number of shards, on
rank 0 only: the other ranks receive its outcome (an error stops every rank with the same message).

Shards without a record entry, and every sample as a second line of defence, are checked in the
dataloader workers as samples are decoded, inside upstream's own pipeline (its shuffling, resampling
and worker / node splitting are untouched): an empty caption is dropped (``--drop-empty-captions``) or
stops the run; the embedding (the sample's own member, or the shard's row in its column, joined by shard
url and sample key) must be present, finite and of the run's width; the dataset index (``KEY.json``
``"index"``, or the column's ``index_start`` + row) must lie in [0, N). A column row is joined only to a
sample whose caption has the row's fingerprint (local, ``pipe:`` and remote shards alike), so a column
of another shard with the same name and keys stops the run at its first sample. A problem stops the
run naming shard, key and fix; checkpoints and logs already written stay as they are.

``--semantic-embeddings DIR`` names one column folder for every shard; ``DIR_A::DIR_B`` pairs folders
with ``--train-data``'s ``::`` sources, in order.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import torch

from openclip_align.data.captions import DROP_FLAG, is_empty
from openclip_align.data.column import COLUMN_META_SUFFIX, COLUMN_SUFFIX, CORPUS_META, EMB_MEMBER, FIX_EMBED, \
    ColumnReader, check_embedding_width, check_vector, column_folder, column_paths, encoder_width, has_fingerprints, \
    legacy_warning, metadata_width, read_column_meta
from openclip_align.data.dataset_index import check_index_range, dataset_size
from openclip_align.data.preflight import RecordCheck, check_batch_per_worker, verify_record
from openclip_align.data.shard_files import listed
from openclip_align.data.sizes import read_sizes
from openclip_align.data.errors import CorpusError, TrainingDataError

from .batch_extras import RAW_CAPTION_FIELD
from .run_state import INDEX, SEMANTIC
from .trainer_errors import REMOTE_URL

FIX_CAPTION = (f"write its caption, pass {DROP_FLAG} to drop such samples, or run `openclip-align data check "
               "--data SHARDS` once to find them all before training")


@dataclass
class ShardPlan:
    """What the run knows about its shards before step 1 (sent from rank 0 to the others)."""
    urls: List[str]
    check: Optional[RecordCheck] = None       # None: remote shards, no record looked for
    column_dir: object = None                        # --semantic-embeddings: DIR or {url: DIR}; None: beside
    width: Optional[int] = None                      # of the precomputed caption embeddings, when known
    total: Optional[int] = None                      # samples the shards hold (record, else the sizes file)
    remote: bool = False
    notes: List[str] = field(default_factory=list)   # what the log says about it
    warnings: List[str] = field(default_factory=list)  # what the log warns about (once per run)
    legacy_noted: bool = False                       # the run already warned of columns without fingerprints

    @property
    def unrecorded(self) -> List[str]:
        return self.urls if self.check is None else self.check.unrecorded


# --- once per run ---------------------------------------------------------------------------------
def once_per_run(args, check: Callable[[], object]):
    """``check()`` on rank 0 only; the other ranks receive its result, or raise the error it raised
    (same type, same message) instead of waiting for a rank that stopped."""
    import torch.distributed as dist

    if not (getattr(args, "distributed", False) and dist.is_available() and dist.is_initialized()):
        return check()
    box: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", check())
        except Exception as err:  # every rank must hear of it, or the others hang in the next collective
            box[0] = ("error", type(err), str(err))
    dist.broadcast_object_list(box, src=0)
    outcome = box[0]
    if outcome[0] == "ok":
        return outcome[1]
    _, kind, message = outcome
    try:
        error = kind(message)
    except Exception:  # an error type that cannot be rebuilt from its message
        error = CorpusError(message)
    raise error


# --- before step 1 ----------------------------------------------------------------------------------
def plan_training_shards(args, needs, expand, source_size) -> ShardPlan:
    """The run's shards and what their record says, checked once per run (rank 0; the others receive
    the plan, or the error, so no rank decides alone while another waits). ``expand(spec)`` is upstream's
    url expansion (``(urls, weights)``), ``source_size(source)`` its size reader (``(samples, shards)``)."""
    return once_per_run(args, lambda: _plan(args, needs, expand, source_size))


def _plan(args, needs, expand, source_size) -> ShardPlan:
    urls = [str(u) for u in expand(args.train_data)[0]]
    column_dir = semantic_dirs(args, expand)
    if any(REMOTE_URL.match(u) for u in urls):
        plan = ShardPlan(urls, column_dir=column_dir, remote=True,
                         notes=["remote shards: every sample is checked as it is decoded"])
        plan.total = dataset_size(args.train_data, source_size)
        _note_legacy_first_column(plan, needs, args)
    else:
        plan = _check_local(args, urls, needs, column_dir, source_size)
    _warn_unchecked_index_across_sources(plan, args, needs)
    for line in plan.warnings:
        logging.warning("openclip-align: %s", line)
    return plan


def _warn_unchecked_index_across_sources(plan: ShardPlan, args, needs) -> None:
    """A ``::`` mixture's sources are often each numbered from 0: their pairs would then share the per-sample
    state of a loss that keeps it (SogCLR). Recorded shards have their index ranges checked against each
    other before step 1; a decoded sample can only be checked against [0, N), so say what is not checked."""
    sources = str(args.train_data).split("::")
    unchecked = plan.urls if plan.remote else (plan.check.unrecorded if plan.check is not None else [])
    if INDEX not in needs or len(sources) < 2 or not unchecked:
        return
    bound = f"[0, {plan.total})" if plan.total else "the dataset size"
    plan.warnings.append(
        f"--train-data has {len(sources)} '::' sources and {len(unchecked)} of {len(plan.urls)} shards have no "
        f"record ({listed(unchecked)}): their dataset indices are checked against {bound} as samples are "
        "decoded, but not against the other sources', so two sources both numbered from 0 would share the loss's "
        "per-sample state; number the pairs once over all sources, and `openclip-align data check --data SHARDS` "
        "on each local source records their index ranges (the run then refuses overlapping ones before step 1)")


def semantic_dir(args) -> Optional[str]:
    """``--semantic-embeddings DIR`` for shards (a csv's is a .npy file, read by the csv dataset)."""
    value = getattr(args, "semantic_embeddings", None)
    if not value:
        return None
    if not os.path.isdir(str(value)):
        raise TrainingDataError(f"--semantic-embeddings {value}: with webdataset shards it names the directory "
                                f"holding their embedding columns (NAME{COLUMN_SUFFIX} + NAME{COLUMN_META_SUFFIX}, "
                                "as `openclip-align embed --data SHARDS --out DIR` writes them); no such directory")
    return str(value)


def semantic_dirs(args, expand):
    """``--semantic-embeddings``: None, one folder for every shard, or ``A::B`` -> {url: folder}, pairing
    each folder with the ``--train-data`` source in the same place (upstream splits sources at ``::``)."""
    value = getattr(args, "semantic_embeddings", None)
    if not value or "::" not in str(value):
        return semantic_dir(args)
    folders = str(value).split("::")
    sources = str(args.train_data).split("::")
    if len(folders) != len(sources):
        raise TrainingDataError(
            f"--semantic-embeddings {value} names {len(folders)} column folders but --train-data has {len(sources)} "
            f"'::' sources; give one folder per source, in the same order (or one folder for all)")
    mapping: Dict[str, str] = {}
    for folder, source in zip(folders, sources):
        if not os.path.isdir(folder):
            raise TrainingDataError(f"--semantic-embeddings: {folder} (for --train-data source {source}) is not a "
                                    "directory; it names the folder holding that source's embedding columns "
                                    "(`openclip-align embed --data SOURCE --out DIR` writes them)")
        for url in expand(source)[0]:
            url = str(url)
            if mapping.get(url, folder) != folder:
                raise TrainingDataError(f"--semantic-embeddings {value}: shard {url} is in two --train-data sources "
                                        f"paired with different column folders ({mapping[url]} and {folder})")
            mapping[url] = folder
    return mapping


def _note_legacy_first_column(plan: ShardPlan, needs, args) -> None:
    """Remote shards: where the first shard's column is a local file, say once if it has no fingerprints."""
    if SEMANTIC not in needs or getattr(args, "semantic_source", "auto") == "on-the-fly" or not plan.urls:
        return
    json_path = column_paths(plan.urls[0], plan.column_dir)[1]
    if REMOTE_URL.match(json_path) or not os.path.isfile(json_path):
        return
    try:
        meta = read_column_meta(json_path)
    except CorpusError:
        return                  # named when the column is opened
    if meta is not None and not has_fingerprints(meta):
        plan.warnings.append(legacy_warning(f"the column {json_path}"))
        plan.legacy_noted = True


def _check_local(args, urls: List[str], needs, column_dir: Optional[str], source_size) -> ShardPlan:
    source = getattr(args, "semantic_source", "auto")
    wants_semantic = SEMANTIC in needs and source != "on-the-fly"
    check = verify_record(
        urls, needs_index=INDEX in needs, needs_semantic=wants_semantic, column_dir=column_dir,
        drop_empty_captions=bool(getattr(args, "drop_empty_captions", False)), semantic_source=source,
        batch_size=args.batch_size, workers=getattr(args, "workers", 1), world_size=getattr(args, "world_size", 1),
        resampled=bool(getattr(args, "dataset_resampled", False)),
        train_num_samples=getattr(args, "train_num_samples", None), source=f"--train-data {args.train_data}")
    plan = ShardPlan(urls, check=check, column_dir=column_dir)
    plan.total = check.samples if not check.unrecorded else dataset_size(args.train_data, source_size)
    if check.unrecorded:
        plan.notes.append(f"{len(check.unrecorded)} of {len(urls)} shards have no record "
                          f"({listed(check.unrecorded)}): their samples are checked as they are decoded "
                          "(`openclip-align data check --data SHARDS` records them)")
        if not check.recorded:
            _batch_per_worker_from_sizes(args, urls)
    if check.rehashed:
        plan.notes.append(f"{len(check.rehashed)} shards have new file times but the recorded size and keys (a copy; "
                          f"their keys were re-read from the tar headers): accepted; `openclip-align data check "
                          f"--data SHARDS` records their new times")
    if check.legacy:
        plan.warnings.append(legacy_warning(f"the column of {len(check.legacy)} of {len(urls)} shards "
                                      f"({listed(check.legacy)})"))
        plan.legacy_noted = True
    if check.dropped:
        plan.notes.append(f"dropping {len(check.dropped)} of {check.samples} recorded samples with an empty or missing "
                          f"caption ({DROP_FLAG})")
    if wants_semantic:
        plan.width = check.width if check.width is not None else _first_column_width(urls, column_dir)
        if check.unrecorded and not plan.legacy_noted:
            first = ShardPlan(check.unrecorded, column_dir=column_dir)
            _note_legacy_first_column(first, needs, args)
            plan.warnings.extend(first.warnings)
            plan.legacy_noted = first.legacy_noted
        if plan.width is not None:
            meta = _corpus_meta(urls, column_dir)
            check_embedding_width(f"--train-data {args.train_data}", plan.width, meta, FIX_EMBED)
            missing = [u for u, how in check.semantic_from.items() if how in ("none", "partial")]
            if source == "auto" and missing:
                model = args.semantic_model
                if encoder_width(model) != plan.width:
                    raise CorpusError(
                        f"--train-data {args.train_data}: the precomputed embeddings have width {plan.width} but "
                        f"--semantic-model {model}, which embeds the samples of {len(missing)} shards without one "
                        f"({listed(missing)}), has width {encoder_width(model)}; pass the "
                        f"--semantic-model that made them, or {FIX_EMBED}")
                plan.notes.append(f"--semantic-source auto: the batches of {len(missing)} shards without precomputed "
                                  f"embeddings ({listed(missing)}) are embedded on the fly by {model}")
    return plan


def _batch_per_worker_from_sizes(args, urls: List[str]) -> None:
    """Without a record, the batch-per-worker check runs on what the sizes file claims (O(shards))."""
    claimed = None if getattr(args, "train_num_samples", None) is not None else read_sizes(os.path.dirname(urls[0]))
    if claimed is None:
        return
    names = [os.path.basename(u) for u in urls]
    if all(n in claimed for n in names):
        check_batch_per_worker(f"--train-data {args.train_data}", [int(claimed[n]) for n in names],
                               args.batch_size, getattr(args, "workers", 1), getattr(args, "world_size", 1),
                               bool(getattr(args, "dataset_resampled", False)))


def _corpus_meta(urls: List[str], column_dir) -> Optional[str]:
    first = column_folder(column_dir, urls[0])
    folders = ([first] if first else []) + [os.path.dirname(urls[0])]
    for folder in folders:
        path = os.path.join(folder, CORPUS_META)
        if os.path.isfile(path):
            return path
    legacy = os.path.dirname(urls[0]).rstrip(os.sep) + COLUMN_META_SUFFIX     # `data build`'s layout
    return legacy if os.path.isfile(legacy) else None


def _first_column_width(urls: List[str], column_dir) -> Optional[int]:
    """The width of the first shard's column (one small json), else of the corpus metadata."""
    meta = read_column_meta(column_paths(urls[0], column_dir)[1])
    if meta is not None:
        return int(meta["dim"])
    path = _corpus_meta(urls, column_dir)
    return metadata_width(path)[0] if path else None


# --- as samples are decoded (picklable: runs in the dataloader workers) ----------------------------
class CaptionFilter:
    """Upstream's sample filter, then: a training sample whose caption is empty is dropped (listed by the
    record, or found now with ``--drop-empty-captions``) or stops the run, naming shard and key."""

    def __init__(self, upstream, train_urls, dropped: FrozenSet[Tuple[str, str]], drop_empty: bool):
        self.upstream, self.train_urls = upstream, frozenset(train_urls)
        self.dropped, self.drop_empty = frozenset(dropped), drop_empty
        self._logged = 0

    def __call__(self, sample) -> bool:
        if not self.upstream(sample):
            return False
        url = str(sample.get("__url__"))
        if url not in self.train_urls:          # validation shards are upstream's alone
            return True
        key = sample.get("__key__")
        if (url, key) in self.dropped:
            return False
        if not is_empty(sample.get("txt")):
            return True
        if not self.drop_empty:
            raise CorpusError(f"shard {url} sample {key} has an empty or missing caption; {FIX_CAPTION}")
        if self._logged < 3:
            self._logged += 1
            logging.warning("openclip-align: dropped shard %s sample %s: empty caption (%s)", url, key, DROP_FLAG)
        return False


def caption_filter(upstream, plan: ShardPlan, drop_empty: bool) -> CaptionFilter:
    """The train pipeline's sample filter while it is built: upstream's, then the plan's caption rules."""
    dropped = plan.check.dropped if plan.check is not None else frozenset()
    return CaptionFilter(upstream, plan.urls, dropped, drop_empty)


class ShardSampleExtras:
    """A decoded shard sample's dataset index and caption embedding, checked (see the module docstring)."""

    def __init__(self, plan: ShardPlan, requested, semantic_source: str):
        self.want_index = INDEX in requested
        self.want_semantic = SEMANTIC in requested and semantic_source != "on-the-fly"
        self.precomputed_only = semantic_source == "precomputed"
        self.index_limit = plan.total
        self.width = plan.width
        self.columns = ColumnReader(plan.column_dir, expected_width=plan.width,
                                    warn_legacy=not plan.legacy_noted)
        self.column_dir = plan.column_dir
        self._has_column: Dict[str, bool] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_has_column"] = {}
        return state

    def has_column(self, url: str) -> bool:
        found = self._has_column.get(url)
        if found is None:
            found = self._has_column[url] = any(os.path.exists(p) for p in column_paths(url, self.column_dir))
        return found

    def __call__(self, sample) -> dict:
        url, key = str(sample.get("__url__", "shard")), sample.get("__key__", "?")
        where = f"shard {url} sample {key}"
        extras = {}
        if self.want_index:
            extras[INDEX] = self._index(sample, url, key, where)
        if self.want_semantic:
            value = self._embedding(sample, url, key, where)
            if value is not None:
                extras[SEMANTIC] = torch.from_numpy(value)
        return extras

    def _index(self, sample, url: str, key: str, where: str) -> int:
        meta = sample.get("json")
        if isinstance(meta, (bytes, str)):
            meta = json.loads(meta)
        index = meta.get("index") if isinstance(meta, dict) else None
        if not isinstance(index, int) or isinstance(index, bool):
            if not self.has_column(url):
                raise CorpusError(
                    f"{where}: the loss needs a per-pair dataset index, but the sample has no KEY.json \"index\" and "
                    "its shard has no embedding column recording where its numbering starts; number the pairs with "
                    "`openclip-align embed --data SHARDS` over all training shards together")
            index = self.columns.index(url, key, _caption(sample))
        if self.index_limit is not None:
            check_index_range(where, index, self.index_limit, error=CorpusError)
        return int(index)

    def _embedding(self, sample, url: str, key: str, where: str):
        if EMB_MEMBER in sample:             # today's format: the embedding inside the shard
            raw = sample[EMB_MEMBER]
            width = check_vector(where, raw, self.width, "recompute the shards' embeddings with "
                                 "`openclip-align embed --data SHARDS`")
            if self.width is None:                   # no metadata: the first sample sets the width
                self.width = width
            value = np.load(io.BytesIO(raw), allow_pickle=False) if isinstance(raw, (bytes, bytearray)) else raw
            return np.asarray(value, dtype=np.float32)
        if not self.precomputed_only and not self.has_column(url):
            return None                              # --semantic-source auto: this batch is embedded on the fly
        return self.columns.lookup(url, key, _caption(sample))


def _caption(sample):
    """The sample's caption as the trainer sees it (before tokenizing), for the column's fingerprint check."""
    caption = sample.get(RAW_CAPTION_FIELD)
    return caption if caption is not None else sample.get("txt")
