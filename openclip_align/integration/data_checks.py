"""The training data, checked once on the host before step 1, so that a bad file stops the run by name.

What is checked (each failure names the file, the row or sample, and the fix):

* captions: none empty or missing (:mod:`openclip_align.data.captions`; ``--drop-empty-captions`` drops
  and counts them instead), for csv files and shards alike;
* size: at least one full batch per process (csv), and for shards a full batch for every dataloader
  worker, whatever shards it is dealt; shards holding fewer samples than ``sizes.json`` claims are
  refused (upstream would wait forever for the missing samples);
* per-pair extras, for losses that read them: every semantic embedding finite, one-dimensional and of
  one width, equal to the width in the embeddings' metadata (``.emb.json`` / ``embeddings.json``) and to
  the width of the encoder that made them; with ``--semantic-source precomputed`` every shard sample
  carries its ``KEY.emb.npy``, with ``auto`` one log line says how many batches are embedded on the fly
  and why; every sample carries its dataset index, unique and in range.

Shards are read once with :mod:`tarfile`: only the small members (caption, json, embedding) are read,
image members are skipped by seeking.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from openclip_align.data.captions import DROP_FLAG, is_empty, refuse
from openclip_align.data.semantic import ENCODER_WIDTHS, canonical_name

from .batch_extras import EMB_MEMBER, MissingExtrasError

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")      # webdataset's KEY.suffix split of a member name
REMOTE_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")
SHOWN = 3


class TrainingDataError(ValueError):
    """The training data cannot be trained on as it is (said before step 1)."""


def _listed(labels: Sequence[str]) -> str:
    return ", ".join(labels[:SHOWN]) + (f" and {len(labels) - SHOWN} more" if len(labels) > SHOWN else "")


# --- semantic embedding widths -------------------------------------------------------------------
def metadata_width(meta_path: str) -> Tuple[Optional[int], Optional[str]]:
    """(dim, model) recorded by ``openclip-align embed`` / ``data build``; (None, None) without a file."""
    if not os.path.isfile(meta_path):
        return None, None
    with open(meta_path) as fh:
        meta = json.load(fh)
    dim = meta.get("dim")
    return (int(dim) if dim is not None else None), meta.get("model")


def check_embedding_width(source: str, width: int, meta_path: str, fix: str) -> None:
    """``width`` agrees with the metadata beside the embeddings and with the encoder it names."""
    if width < 2:
        raise MissingExtrasError(
            f"{source}: semantic embeddings of width {width}; a 1-wide normalised embedding is +-1, so every "
            f"pair would look alike or opposite and the semantic term would carry no information. {fix}")
    dim, model = metadata_width(meta_path)
    if dim is not None and dim != width:
        raise MissingExtrasError(f"{source}: embeddings of width {width}, but {meta_path} records width {dim}; "
                                 f"the two files do not belong together. {fix}")
    expected = ENCODER_WIDTHS.get(canonical_name(model)) if model else None
    if expected is not None and expected != width:
        raise MissingExtrasError(f"{source}: embeddings of width {width}, but {meta_path} names the encoder "
                                 f"{model}, whose embeddings have width {expected}. {fix}")


def encoder_width(model: str) -> int:
    """Width of ``--semantic-model``'s embeddings (loads the encoder unless it is a bundled one)."""
    known = ENCODER_WIDTHS.get(canonical_name(model))
    if known is not None:
        return known
    from openclip_align.data.semantic import embedding_dim, load_sentence_encoder

    return embedding_dim(load_sentence_encoder(model))


def csv_meta_path(embeddings_path: str) -> str:
    base = embeddings_path[:-len(".npy")] if embeddings_path.endswith(".npy") else embeddings_path
    return base + ".json"


# --- csv captions ----------------------------------------------------------------------------------
def drop_empty_captions_requested() -> bool:
    from . import trainer_run

    run = trainer_run.RUN
    return bool(run is not None and getattr(run.args, "drop_empty_captions", False))


def check_csv_captions(path: str, captions: Sequence) -> List[int]:
    """Positions of rows without a caption; raises unless ``--drop-empty-captions`` (then logs the count)."""
    from openclip_align.data.captions import csv_row_label, empty_positions

    bad = empty_positions(captions)
    if bad and not drop_empty_captions_requested():
        raise refuse(path, [csv_row_label(i) for i in bad], len(captions))
    if bad:
        logging.warning("openclip-align: %s: dropped %d of %d pairs with an empty or missing caption (%s)",
                        path, len(bad), len(captions), DROP_FLAG)
    return bad


# --- shards ---------------------------------------------------------------------------------------
@dataclass
class ShardScan:
    """What the training shards actually hold."""
    urls: List[str]
    counts: Dict[str, int] = field(default_factory=dict)          # url -> samples read
    dropped: FrozenSet[Tuple[str, str]] = frozenset()             # (shard url, key) left out
    without_embedding: List[str] = field(default_factory=list)    # "shard sample key" lacking KEY.emb.npy
    width: Optional[int] = None

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    def kept(self, url: str) -> int:
        return self.counts[url] - sum(1 for shard, _ in self.dropped if shard == url)


class SkipListed:
    """Upstream's sample filter, also leaving out the samples the scan listed (picklable for workers)."""

    def __init__(self, upstream, listed: FrozenSet[Tuple[str, str]]):
        self.upstream, self.listed = upstream, listed

    def __call__(self, sample) -> bool:
        return (str(sample.get("__url__")), sample.get("__key__")) not in self.listed and self.upstream(sample)


@contextlib.contextmanager
def dropping_listed(data_module, scan: Optional[ShardScan]):
    """While the train pipeline is built, its caption filter also drops the scan's listed samples."""
    if scan is None or not scan.dropped:
        yield
        return
    upstream = data_module.filter_no_caption_or_no_image
    data_module.filter_no_caption_or_no_image = SkipListed(upstream, scan.dropped)
    try:
        yield
    finally:
        data_module.filter_no_caption_or_no_image = upstream


def _samples(url: str, wanted: FrozenSet[str]):
    """(key, {suffix: bytes or None}) per sample of a shard; only ``wanted`` members are read."""
    key, members = None, {}
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isfile() else None
                if not match:
                    continue
                prefix, suffix = match.groups()
                if prefix != key:
                    if key is not None:
                        yield key, members
                    key, members = prefix, {}
                members[suffix] = tar.extractfile(member).read() if suffix in wanted else None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TrainingDataError(f"training shard {url} cannot be read to its end after sample {key} ({err}); "
                                "it is damaged or truncated: rebuild it") from err
    if key is not None:
        yield key, members


def scan_training_shards(args, needs_semantic: bool, needs_index: bool, data_module) -> Optional[ShardScan]:
    """Read every training shard once; raise on the first kind of problem found, naming the samples."""
    urls = list(data_module.expand_urls(args.train_data)[0])
    if any(REMOTE_URL.match(u) for u in urls):
        logging.info("openclip-align: remote training shards are not scanned before step 1")
        return None
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise TrainingDataError(f"--train-data: {len(missing)} of {len(urls)} shards do not exist ({_listed(missing)})")
    source = getattr(args, "semantic_source", "auto")
    read_embeddings = needs_semantic and source != "on-the-fly"
    wanted = frozenset({"txt"} | ({"json"} if needs_index else set()) | ({EMB_MEMBER} if read_embeddings else set()))
    scan = ShardScan(urls)
    empty: List[Tuple[str, str]] = []
    indices: Dict[int, str] = {}
    index_problems: List[str] = []
    fix = "recompute the shards' embeddings with `openclip-align embed --data SHARDS --out DIR`"
    for url in urls:
        count = 0
        for key, members in _samples(url, wanted):
            count += 1
            where = f"{url} sample {key}"
            if is_empty(members.get("txt")):
                empty.append((url, key))
                continue
            if needs_index:
                index = _index_of(members.get("json"))
                if index is None:
                    index_problems.append(f"{where} (no KEY.json with an integer \"index\")")
                elif index in indices:
                    index_problems.append(f"{where} (index {index} also in {indices[index]})")
                else:
                    indices[index] = where
            if read_embeddings:
                if members.get(EMB_MEMBER) is None:
                    scan.without_embedding.append(where)
                    continue
                scan.width = _check_vector(where, members[EMB_MEMBER], scan.width, fix)
        scan.counts[url] = count
    if empty:
        if not getattr(args, "drop_empty_captions", False):
            raise refuse(f"--train-data {args.train_data}", [f"{u} sample {k}" for u, k in empty], scan.samples)
        scan.dropped = frozenset(empty)
        logging.warning("openclip-align: dropped %d of %d training samples with an empty or missing caption (%s)",
                        len(empty), scan.samples, DROP_FLAG)
    if index_problems:
        raise MissingExtrasError(
            f"--loss {args.loss} needs a per-pair dataset index (each sample's KEY.json \"index\"), but "
            f"{_listed(index_problems)}; number the pairs 0..N-1 once, e.g. with `openclip-align embed --data "
            "SHARDS --out DIR` (it adds an index where there is none)")
    out_of_range = sorted(i for i in indices if not 0 <= i < scan.samples)
    if out_of_range:
        raise MissingExtrasError(
            f"--loss {args.loss}: {indices[out_of_range[-1]]} has index {out_of_range[-1]}, outside [0, "
            f"{scan.samples}) (the shards hold {scan.samples} samples); number the pairs 0..N-1")
    if read_embeddings:
        _check_shard_embeddings(args, scan, source, fix)
    _check_sizes(args, scan)
    _check_a_batch_per_worker(args, scan)
    return scan


def _index_of(raw) -> Optional[int]:
    try:
        value = json.loads(raw).get("index") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_vector(where: str, raw: bytes, width: Optional[int], fix: str) -> int:
    try:
        value = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as err:
        raise MissingExtrasError(f"{where}: KEY.{EMB_MEMBER} is not a readable .npy array ({err}); {fix}") from err
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.floating):
        raise MissingExtrasError(f"{where}: KEY.{EMB_MEMBER} must be a 1-D floating point vector, got shape "
                                 f"{value.shape} and dtype {value.dtype}; {fix}")
    if width is not None and value.shape[0] != width:
        raise MissingExtrasError(f"{where}: KEY.{EMB_MEMBER} has width {value.shape[0]}, the samples before it "
                                 f"width {width}; every embedding must come from one encoder: {fix}")
    if not np.isfinite(value).all():
        raise MissingExtrasError(f"{where}: KEY.{EMB_MEMBER} holds non-finite values (NaN or inf); {fix}")
    return int(value.shape[0])


def _check_shard_embeddings(args, scan: ShardScan, source: str, fix: str) -> None:
    missing = scan.without_embedding
    if missing and source == "precomputed":
        raise MissingExtrasError(
            f"--semantic-source precomputed: {len(missing)} of {scan.samples} training samples have no "
            f"KEY.{EMB_MEMBER} member ({_listed(missing)}); {fix}, or pass --semantic-source auto to embed "
            "the batches holding them on the fly")
    if scan.width is not None:
        folder = os.path.dirname(scan.urls[0])
        meta = os.path.join(folder, "embeddings.json")
        if not os.path.isfile(meta):
            meta = folder.rstrip(os.sep) + ".emb.json"          # the layout `data build` writes
        check_embedding_width(f"--train-data {args.train_data}", scan.width, meta, fix[0].upper() + fix[1:])
        if missing:                       # auto: some batches precomputed, some embedded now: one space
            model = args.semantic_model
            if encoder_width(model) != scan.width:
                raise MissingExtrasError(
                    f"--train-data {args.train_data}: the precomputed embeddings have width {scan.width} but "
                    f"--semantic-model {model}, which embeds the {len(missing)} samples without one, has width "
                    f"{encoder_width(model)}; pass the --semantic-model that made them, or {fix}")


def _sizes_file(urls: Sequence[str]) -> str:
    return os.path.join(os.path.dirname(urls[0]), "sizes.json")     # where upstream looks


def _check_sizes(args, scan: ShardScan) -> None:
    if getattr(args, "train_num_samples", None) is not None:
        return                                     # upstream then does not read sizes.json
    path = _sizes_file(scan.urls)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        claimed = json.load(fh)
    for url in scan.urls:
        name = os.path.basename(url)
        if name not in claimed:
            raise TrainingDataError(f"{path} has no entry for the training shard {name}; rebuild sizes.json "
                                    "(`openclip-align embed --data SHARDS --out DIR` writes one) or pass "
                                    "--train-num-samples")
        if int(claimed[name]) > scan.counts[url]:
            raise TrainingDataError(
                f"{path} says {url} holds {claimed[name]} samples, but it holds {scan.counts[url]}; upstream would "
                "wait forever for the missing ones. Rebuild sizes.json (`openclip-align embed --data SHARDS --out "
                "DIR` writes one), or delete it and pass --train-num-samples")


def _check_a_batch_per_worker(args, scan: ShardScan) -> None:
    """Every dataloader worker must be able to fill a batch from the shards it is dealt, or the epoch
    never ends (upstream's webdataset loader waits for full batches)."""
    kept = sorted(scan.kept(url) for url in scan.urls)
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    batch = int(args.batch_size)
    if sum(kept) < batch * world:
        raise TrainingDataError(
            f"--train-data {args.train_data}: the shards hold {sum(kept)} usable samples, fewer than one batch of "
            f"{batch} x {world} process(es); training would wait forever for the first batch. Lower --batch-size "
            "or add samples")
    if getattr(args, "dataset_resampled", False):
        return
    dealt = len(kept) // (workers * world)
    fewest = sum(kept[:dealt]) if dealt else 0
    if fewest < batch:
        raise TrainingDataError(
            f"--train-data {args.train_data}: {len(kept)} shards over {workers * world} dataloader worker(s) deal a "
            f"worker as few as {dealt} shard(s) holding {fewest} samples, fewer than one batch of {batch}; that "
            "worker would wait forever. Lower --batch-size or --workers, or put more samples per shard")


# --- csv and general ---------------------------------------------------------------------------------
def check_has_a_batch(args, train) -> None:
    """A csv dataset smaller than one batch gives zero training steps; say so instead."""
    loader = train.dataloader
    if getattr(loader, "num_batches", None) != 0:
        return
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else getattr(loader, "num_samples", 0)
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    raise TrainingDataError(
        f"--train-data {args.train_data}: {size} training pairs make no full batch of --batch-size "
        f"{args.batch_size} x {world} process(es) (training drops the last partial batch); lower --batch-size "
        "or add pairs")


def log_on_the_fly(args, train, scan: Optional[ShardScan]) -> None:
    """``--semantic-source auto``: one line saying how many batches get their embeddings on the fly, and why."""
    if getattr(args, "semantic_source", None) != "auto":
        return
    batches = getattr(train.dataloader, "num_batches", None)
    model = args.semantic_model
    if scan is None:
        dataset = getattr(train.dataloader, "dataset", None)
        if getattr(dataset, "embeddings", 1) is None:
            logging.info("openclip-align: --semantic-source auto: all %s batches per epoch are embedded on the fly "
                         "by --semantic-model %s: the csv has no precomputed embeddings (%s)", batches, model,
                         getattr(dataset, "embeddings_path", "no .emb.npy beside it"))
        else:
            logging.info("openclip-align: --semantic-source auto: 0 batches are embedded on the fly: every row has "
                         "its precomputed embedding")
        return
    missing = len(scan.without_embedding)
    if not missing:
        logging.info("openclip-align: --semantic-source auto: 0 batches are embedded on the fly: every sample "
                     "carries its KEY.%s", EMB_MEMBER)
    else:
        at_most = missing if batches is None else min(missing, batches)
        logging.info("openclip-align: --semantic-source auto: up to %d of the %s batches per epoch are embedded on the "
                     "fly by --semantic-model %s, because %d of %d samples have no KEY.%s (%s); a batch holding "
                     "one of them is embedded whole", at_most, batches, model, missing, scan.samples, EMB_MEMBER,
                     _listed(scan.without_embedding))
