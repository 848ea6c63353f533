"""Ordered readers for evaluation data: image-caption pairs and labelled images.

Pairs come from (a) a CSV in OpenCLIP's training format (``--csv-img-key filepath``,
``--csv-caption-key title``, ``--csv-separator`` tab by default) or (b) webdataset shards given as a
brace pattern (``dir/train-{000000..000003}.tar``; several patterns joined by ``::`` like
open_clip_train), each sample holding ``KEY.png|jpg|jpeg|webp``, ``KEY.txt`` and optionally
``KEY.json``. Classification sets are CSVs with an image column and an integer label column.

Everything is read in file order, without shuffling, so that row i of the embeddings is sample i.
CSV image paths are taken as written (relative to the working directory, as open_clip_train does);
a relative path that does not exist there is looked up next to the CSV instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
DEFAULT_IMG_KEY, DEFAULT_CAPTION_KEY, DEFAULT_LABEL_KEY, DEFAULT_SEPARATOR = "filepath", "title", "label", "\t"


@dataclass
class Pair:
    """One image-caption pair; ``image`` is a PIL image in RGB."""

    image: object
    caption: str
    key: str = ""
    meta: dict = field(default_factory=dict)


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    it = iter(iterable)
    while batch := list(islice(it, size)):
        yield batch


def _load_image(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


# --- CSV -------------------------------------------------------------------------------------------
def _read_table(path, columns: Sequence[str], sep: str, flag_hint: str):
    import pandas as pd

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file not found: {path}")
    frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = ""
        if len(frame.columns) == 1:
            hint = f" (only one column was found: is the separator right? it is {sep!r}; see --csv-separator)"
        raise ValueError(f"{path}: no column(s) {missing}; columns are {list(frame.columns)}{hint}. "
                         f"Choose the columns with {flag_hint}")
    return frame


def _first_rows(path: str, img_key: str, key: str, sep: str, key_flag: str, limit: Optional[int]):
    """The image column and one other column of a CSV, as lists, its first ``limit`` rows (all with None)."""
    frame = _read_table(path, [img_key, key], sep, f"--csv-img-key / {key_flag}")
    if limit is not None:
        frame = frame.iloc[:limit]
    return frame[img_key].tolist(), frame[key].tolist()


def _resolve_paths(raw_paths: Sequence[str], csv_path: str) -> List[str]:
    base = os.path.dirname(os.path.abspath(csv_path))
    resolved, missing = [], []
    for row, raw in enumerate(raw_paths):
        path = os.path.expanduser(raw)
        if not os.path.isabs(path) and not os.path.exists(path):
            candidate = os.path.join(base, path)
            path = candidate if os.path.exists(candidate) else path
        if not os.path.isfile(path):
            missing.append(f"row {row}: {raw!r}")
        resolved.append(path)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{csv_path}: image files not found ({shown}). Relative paths are looked up "
                                "in the working directory, then next to the CSV")
    return resolved


class CsvPairs:
    """Image-caption pairs from an OpenCLIP-format CSV, in row order; ``limit`` keeps the first rows."""

    def __init__(self, path, img_key: str = DEFAULT_IMG_KEY, caption_key: str = DEFAULT_CAPTION_KEY,
                 sep: str = DEFAULT_SEPARATOR, limit: Optional[int] = None):
        self.path = os.fspath(path)
        raw_paths, self.captions = _first_rows(self.path, img_key, caption_key, sep, "--csv-caption-key", limit)
        self.filepaths = _resolve_paths(raw_paths, self.path)

    def __len__(self) -> int:
        return len(self.captions)

    def __iter__(self) -> Iterator[Pair]:
        for row, (path, caption) in enumerate(zip(self.filepaths, self.captions)):
            yield Pair(_load_image(path), caption, key=str(row), meta={"filepath": path, "index": row})


class CsvImages:
    """Labelled images ``(image, label)`` from a classification CSV (``filepath``, integer ``label``)."""

    def __init__(self, path, img_key: str = DEFAULT_IMG_KEY, label_key: str = DEFAULT_LABEL_KEY,
                 sep: str = DEFAULT_SEPARATOR, limit: Optional[int] = None):
        self.path = os.fspath(path)
        raw_paths, raw_labels = _first_rows(self.path, img_key, label_key, sep, "--csv-label-key", limit)
        labels = []
        for row, raw in enumerate(raw_labels):
            try:
                labels.append(int(raw))
            except ValueError:
                raise ValueError(f"{self.path}: row {row}: label {raw!r} in column {label_key!r} "
                                 "is not an integer class index") from None
        self.labels = labels
        self.filepaths = _resolve_paths(raw_paths, self.path)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Tuple[object, int]]:
        for path, label in zip(self.filepaths, self.labels):
            yield _load_image(path), label


# --- webdataset shards -------------------------------------------------------------------------------
def expand_shards(pattern: str) -> List[str]:
    """Expand ``a-{000..003}.tar::b.tar`` into a list of shard paths, checking local files exist."""
    import braceexpand

    urls = [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found (first: {missing[0]}) "
                                f"for pattern {pattern!r}")
    return urls


class ShardPairs:
    """Image-caption pairs from webdataset shards, in shard and member order (no shuffling)."""

    def __init__(self, pattern: str, limit: Optional[int] = None):
        self.pattern = pattern
        self.urls = expand_shards(pattern)
        self.limit = limit

    def __len__(self) -> int:
        raise TypeError("the number of samples in webdataset shards is unknown before reading them")

    def __iter__(self) -> Iterator[Pair]:
        import webdataset as wds

        dataset = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=_all_shards).decode("pil")
        samples = dataset if self.limit is None else islice(dataset, self.limit)
        for sample in samples:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image is None:
                raise ValueError(f"{url}: sample {key!r} has no image member (one of "
                                 f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}); it has {sorted(sample)}")
            if "txt" not in sample:
                raise ValueError(f"{url}: sample {key!r} has no .txt caption; it has {sorted(sample)}")
            meta = sample.get("json") or {}
            if isinstance(meta, (bytes, str)):
                meta = json.loads(meta)
            yield Pair(image.convert("RGB"), str(sample["txt"]), key=key, meta=dict(meta))


def _all_shards(urls):
    """Every process reads every shard: evaluation wants all samples, in order, on each rank."""
    return urls


def is_shard_pattern(data: str) -> bool:
    data = os.fspath(data)
    return ".tar" in data or "{" in data or "::" in data


def open_pairs(data, img_key: str = DEFAULT_IMG_KEY, caption_key: str = DEFAULT_CAPTION_KEY,
               sep: str = DEFAULT_SEPARATOR, limit: Optional[int] = None):
    """A :class:`ShardPairs` for shard patterns (``.tar``, braces or ``::``), else a :class:`CsvPairs`."""
    data = os.fspath(data)
    if is_shard_pattern(data):
        return ShardPairs(data, limit=limit)
    return CsvPairs(data, img_key=img_key, caption_key=caption_key, sep=sep, limit=limit)
