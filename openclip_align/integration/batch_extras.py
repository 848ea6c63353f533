"""Per-pair extras (dataset index, semantic embedding, raw caption) travelling with the batch.

``open_clip_train.train`` unpacks every batch as ``images, texts = batch`` and calls the loss with
the model outputs only. So the extras take a side road:

1. while the trainer builds its datasets (:func:`requesting`), OpenCLIP's own csv and webdataset
   pipelines are asked to yield ``(image, text, extras)`` instead of ``(image, text)``: the csv
   dataset class is subclassed, and the three webdataset stages that shape the sample (``map_dict``,
   ``to_tuple`` and ``batched``) are swapped for versions that also carry the extras. Sharding,
   shuffling, resampling and epoch sizes stay upstream's;
2. the extras of a batch are collated where the batch is made, inside the loader worker
   (:func:`collate_extras`; csv: torch's ``default_collate`` does the same): one tensor per name
   crosses to the main process, so a batch costs a constant number of shared-memory file
   descriptors whatever its size (one tensor per sample would cost one descriptor each: 512 per
   batch exhausted ``ulimit -n 1024`` with two workers);
3. :class:`ExtrasLoader` wraps the resulting dataloader: it yields ``(images, texts)`` as before
   and pushes each batch's extras onto the run's stash (:class:`BatchStash`, ``run.stash``);
4. the loss adapter takes from that stash the extras of exactly the batches whose features it
   receives (the last ``accum_freq`` batches when gradient accumulation is on).

Extras formats: csv: an ``index`` column (else the row number) and a row-aligned embedding file
(:mod:`openclip_align.data.csv_embeddings`); webdataset: ``KEY.json`` with ``"index"``, and the caption
embedding in the shard's embedding column (joined by shard url and key) or the sample's own embedding
member (:class:`training_shards.ShardSampleExtras`).

Values are validated on the host, never per step on the training device: the csv's whole embedding
file (shape, finite) when the dataset is built, the csv index range against the dataset size before step 1
(:mod:`.data_wiring`), and each shard sample's embedding and index as the sample is decoded.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Dict, FrozenSet, List

import numpy as np
import torch

from openclip_align.data import csv_embeddings
from openclip_align.data.errors import MissingExtrasError

from .csv_checks import check_csv_captions
from .loader_health import FullPassGuard
from .run_state import CAPTION, INDEX, SEMANTIC


# --- what the current dataset construction asks for (set only inside `requesting`) ------------
_requested: FrozenSet[str] = frozenset()
_options: Dict[str, object] = {}


@contextlib.contextmanager
def requesting(extras, **options):
    """Make OpenCLIP's datasets built inside this block carry ``extras`` (a set of names)."""
    global _requested, _options
    previous = (_requested, _options)
    _requested, _options = frozenset(extras), dict(options)
    try:
        yield
    finally:
        _requested, _options = previous


# --- csv ------------------------------------------------------------------------------------
def make_csv_dataset_class(upstream_cls):
    """A subclass of open_clip_train's CsvDataset that also returns extras when asked to."""

    class CsvDatasetWithExtras(upstream_cls):
        def __init__(self, input_filename, transforms, img_key, caption_key, sep="\t", tokenizer=None):
            super().__init__(input_filename, transforms, img_key, caption_key, sep=sep, tokenizer=tokenizer)
            self.extras = _requested
            self.indices = None
            self.embeddings = None
            self.embeddings_path = None
            self.rows = None               # csv row of each pair kept, when --drop-empty-captions dropped some
            n_rows = len(self.captions)
            dropped = set(check_csv_captions(input_filename, self.captions))
            if dropped:
                self.rows = np.array([i for i in range(n_rows) if i not in dropped], dtype=np.int64)
                self.images = [self.images[i] for i in self.rows]
                self.captions = [self.captions[i] for i in self.rows]
            if not self.extras:
                return
            if INDEX in self.extras:
                import pandas as pd

                key = _options.get("csv_index_key", "index")
                header = pd.read_csv(input_filename, sep=sep, nrows=0).columns
                if key in header:
                    column = pd.read_csv(input_filename, sep=sep, usecols=[key])[key]
                    if column.isna().any() or column.duplicated().any():
                        raise MissingExtrasError(
                            f"{input_filename}: column {key!r} must hold a unique integer index per row")
                    self.indices = column.astype("int64").to_numpy()
                    if self.rows is not None:
                        self.indices = self.indices[self.rows]
                else:                          # the pair's position (after any dropped rows)
                    self.indices = np.arange(len(self.captions), dtype=np.int64)
            if SEMANTIC in self.extras and _options.get("semantic_precomputed", True):
                path = _options.get("csv_embeddings") or csv_embeddings.embedding_path(input_filename)
                if os.path.exists(path):
                    self.embeddings = csv_embeddings.open_rows(path, n_rows)
                    self.embeddings_path = path
                    check_embedding_file(path, self.embeddings)
                    csv_embeddings.check_width(path, int(self.embeddings.shape[1]), input_filename)
                elif not _options.get("semantic_on_the_fly", False):
                    raise MissingExtrasError(
                        f"--loss needs semantic caption embeddings but {path} does not exist; run "
                        f"`openclip-align embed --data {input_filename}` once, or pass "
                        "--semantic-source on-the-fly")

        def __getitem__(self, idx):
            image, text = super().__getitem__(idx)
            if not self.extras:
                return image, text
            extras = {CAPTION: str(self.captions[idx])}
            if self.indices is not None:
                extras[INDEX] = int(self.indices[idx])
            if self.embeddings is not None:
                row = idx if self.rows is None else int(self.rows[idx])
                extras[SEMANTIC] = torch.from_numpy(np.array(self.embeddings[row], dtype=np.float32))
            return image, text, extras

    CsvDatasetWithExtras.__name__ = CsvDatasetWithExtras.__qualname__ = "CsvDatasetWithExtras"
    return CsvDatasetWithExtras


def check_embedding_file(path: str, embeddings: np.ndarray, chunk_values: int = 1 << 24) -> None:
    """Finite everywhere, without every rank reading every row.

    ``openclip-align embed`` records beside the file whether the values it wrote are finite, with the
    file's size and a hash of its ends: a file that matches its record is trusted. Any other (written by an
    older version or by hand, or changed since) is read once per run, in chunks, by rank 0 (by another rank
    too only when its copy differs from rank 0's), and every rank stops if a value is not finite."""
    from . import rank_agreement

    recorded = csv_embeddings.recorded_finite(path, csv_embeddings.meta_path(path))
    views = rank_agreement.gather((recorded, csv_embeddings.fingerprint(path)))
    if all(status is True for status, _ in views):
        return
    me = rank_agreement.rank()
    (status, ours), (_, rank0s) = views[me], views[0]
    read = status is None and (me == 0 or ours != rank0s)      # rank 0 reads for every rank with the same file
    rank_agreement.agree(csv_embeddings.finiteness_problem(path, embeddings, status, read, chunk_values),
                         MissingExtrasError)


# --- webdataset -----------------------------------------------------------------------------
RAW_CAPTION_FIELD = "__openclip_align_caption__"   # a webdataset sample's caption before tokenizing


class WebdatasetWithExtras:
    """Stands in for the ``webdataset`` module inside ``open_clip_train.data``.

    Everything is webdataset's own, except the two sample-shaping stages, which carry the extras
    when (and only when) a pipeline is built inside :func:`requesting`.
    """

    def __init__(self, wds_module):
        self._wds = wds_module

    def __getattr__(self, name):
        return getattr(self._wds, name)

    def map_dict(self, **handlers):
        if not _requested or set(handlers) != {"image", "text"}:
            return self._wds.map_dict(**handlers)
        return _Chained(self._wds.map(_remember_caption), self._wds.map_dict(**handlers))

    def to_tuple(self, *keys, **kwargs):
        if not _requested or keys != ("image", "text"):
            return self._wds.to_tuple(*keys, **kwargs)
        return self._wds.map(_SampleToTupleWithExtras(_requested, _options.get("shard_extras")))

    def batched(self, batchsize, collation_fn=None, partial=True):
        """Upstream's batching; with extras requested its collation also stacks them (in the worker), and a
        training pipeline (partial batches dropped) stops when a pass over its shards makes no batch."""
        if collation_fn is None:
            collation_fn = self._wds.filters.default_collation_fn
        if _requested:
            collation_fn = _CollateWithExtras(collation_fn)
        stage = self._wds.batched(batchsize, collation_fn=collation_fn, partial=partial)
        return stage if partial else FullPassGuard(stage, batchsize)


def _remember_caption(sample):
    sample[RAW_CAPTION_FIELD] = sample.get("text")
    return sample


class _Chained:
    """Two pipeline stages run as one (a class, not a closure, so dataloader workers can pickle it)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, data):
        return self.second(self.first(data))


class _SampleToTupleWithExtras:
    """(image, tokens, extras) from a decoded sample; picklable for dataloader workers.

    The raw caption is carried when asked for; the index and embedding come from ``shard_extras``
    (:class:`training_shards.ShardSampleExtras`), which checks them as the sample is decoded.
    """

    def __init__(self, requested, shard_extras=None):
        self.requested = frozenset(requested)
        self.shard_extras = shard_extras

    def __call__(self, sample):
        extras = {}
        caption = sample.get(RAW_CAPTION_FIELD)
        if caption is not None and CAPTION in self.requested:
            extras[CAPTION] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if self.shard_extras is not None:
            extras.update(self.shard_extras(sample))
        return sample["image"], sample["text"], extras


class _CollateWithExtras:
    """Batch collation for ``(image, text, extras)`` samples: images and texts as ``upstream`` collates them,
    the extras by :func:`collate_extras`; picklable for dataloader workers."""

    def __init__(self, upstream):
        self.upstream = upstream

    def __call__(self, samples):
        if not samples or len(samples[0]) != 3 or not isinstance(samples[0][2], dict):
            return self.upstream(samples)
        images, texts = self.upstream([sample[:2] for sample in samples])
        return [images, texts, collate_extras([sample[2] for sample in samples])]


# --- batches and the stash -----------------------------------------------------------------
def collate_extras(extras) -> Dict[str, object]:
    """A batch's extras as one dict, rows in sample order: the raw captions a list of strings, the dataset
    index one int64 tensor, every other value (the caption embedding) one stacked tensor.

    A key that some sample of the batch lacks is left out for the whole batch (with ``--semantic-source
    auto`` a batch mixing samples with and without a precomputed embedding is then embedded on the fly from
    its captions). A dict is taken as already collated."""
    if isinstance(extras, dict):
        return extras
    rows = list(extras)
    common = set(rows[0]) if rows else set()
    for row in rows[1:]:
        common &= set(row)
    out = {}
    for key in common:
        values = [row[key] for row in rows]
        if key == CAPTION:
            out[key] = list(values)
        elif key == INDEX:
            out[key] = torch.as_tensor(values, dtype=torch.long)
        else:
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
    return out


class BatchStash:
    """The extras of the most recent batches, newest last (as many as one optimizer step uses)."""

    def __init__(self, depth: int = 1):
        self._items = collections.deque(maxlen=max(1, depth))
        self.pushes = 0               # batches seen so far: identifies "the same batches" across calls

    def reset(self, depth: int) -> None:
        self._items = collections.deque(maxlen=max(1, depth))

    def push(self, images, texts, extras) -> None:
        self._items.append({"images": images, "texts": texts, "extras": extras})
        self.pushes += 1

    def record_model_inputs(self, images, texts) -> None:
        """The newest batch as the model received it (on the training device, in the input dtype), so that
        a teacher can run on it without a second host-to-device copy. The first call after a push wins:
        with gradient accumulation upstream runs the model twice on each batch."""
        if not self._items:
            return
        item = self._items[-1]
        if "model_images" not in item and len(texts) == len(item["texts"]):
            item["model_images"], item["model_texts"] = images, texts

    def clear(self) -> None:
        self._items.clear()

    def take(self, n_rows: int) -> Dict[str, object]:
        """Concatenate the newest batches whose sizes add up to ``n_rows`` (the features' batch)."""
        chosen: List[dict] = []
        total = 0
        for item in reversed(self._items):
            if total >= n_rows:
                break
            chosen.append(item)
            total += len(item["texts"])
        if total != n_rows:
            raise MissingExtrasError(
                f"the loss got features for {n_rows} pairs but the stashed batches hold {total}; the "
                "extras side channel only works with the dataloader built by open_clip_train's get_data")
        chosen.reverse()
        # the model's own inputs (already on the device) when every chosen batch has them
        on_device = all("model_images" in c for c in chosen)
        image_key, text_key = ("model_images", "model_texts") if on_device else ("images", "texts")
        out: Dict[str, object] = {
            "generation": (self.pushes, n_rows),
            "images": _cat([c[image_key] for c in chosen]),
            "texts": _cat([c[text_key] for c in chosen]),
        }
        keys = set(chosen[0]["extras"])
        for c in chosen[1:]:
            keys &= set(c["extras"])
        for key in keys:
            parts = [c["extras"][key] for c in chosen]
            out[key] = sum(parts, []) if key == CAPTION else _cat(parts)
        return out


def _cat(parts):
    """One batch as it is (a pinned tensor stays pinned), several concatenated."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class ExtrasLoader:
    """Wraps a dataloader yielding (images, texts, extras): yields (images, texts), stashes extras."""

    def __init__(self, loader, stash: BatchStash):
        self._loader = loader
        self._stash = stash

    def __getattr__(self, name):          # num_batches, num_samples, sampler, batch_size, ...
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            if len(batch) == 3:
                images, texts, extras = batch
                self._stash.push(images, texts, collate_extras(extras))
            else:
                images, texts = batch
                self._stash.push(images, texts, {})
            yield images, texts
