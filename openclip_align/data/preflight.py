"""The trainer's check of recorded shards before step 1 (:func:`verify_record`), and the shard-level
checks it shares with ``data check`` and the per-sample checks.

Verifying a recorded corpus costs a stat and, at most, a small json read per shard: nothing grows with
the number of samples. Shards without a record entry are checked sample by sample as they are decoded
(:func:`.column.check_vector`, :class:`.column.ColumnReader`). Every problem raises
:class:`.errors.CorpusError` in one line naming the shard, the key and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from .captions import DROP_FLAG
from .column import EMB_MEMBER, FIX_EMBED, FIX_OTHER_SOURCE, same_model, check_embedding_width, column_folder, \
    column_paths, column_problem, has_fingerprints, read_column_meta
from .record import FIX_CHECK, recorded_entries
from .dataset_index import outside
from .errors import CorpusError
from .shard_files import fingerprint, keys_sha256_of_shard, listed, shard_name
from .sizes import check_sizes_file

def check_batch_per_worker(source: str, kept: Sequence[int], batch_size: int, workers: int = 1,
                           world_size: int = 1, resampled: bool = False) -> None:
    """Every dataloader worker can fill a batch from the shards it is dealt, or the epoch never ends
    (upstream's webdataset loader waits for full batches)."""
    kept = sorted(int(k) for k in kept)
    world, workers, batch = max(1, int(world_size or 1)), max(1, int(workers or 1)), int(batch_size)
    if sum(kept) < batch * world:
        raise CorpusError(
            f"{source}: the shards hold {sum(kept)} usable samples, fewer than one batch of {batch} x {world} "
            "process(es); training would wait forever for the first batch. Lower --batch-size or add samples")
    if resampled:
        return
    dealt = len(kept) // (workers * world)
    fewest = sum(kept[:dealt]) if dealt else 0
    if fewest < batch:
        raise CorpusError(
            f"{source}: {len(kept)} shards over {workers * world} dataloader worker(s) deal a worker as few as "
            f"{dealt} shard(s) holding {fewest} samples, fewer than one batch of {batch}; that worker would wait "
            "forever. Lower --batch-size or --workers, or put more samples per shard")


def check_index_ranges(source: str, ranges: Sequence[Tuple[int, int, str]], total: int) -> None:
    """Shards' dataset index ranges [lo, hi] are disjoint and inside [0, total): with indices unique
    inside each shard, every index of the corpus is then unique and in range."""
    fix = "number the pairs 0..N-1 once over all training shards together (`openclip-align embed --data SHARDS` " \
          "records where each shard's numbering starts)"
    for lo, hi, where in ranges:
        bad = outside(lo, hi, total)
        if bad is not None:
            raise CorpusError(f"{source}: {where} has index {bad}, outside [0, {total}) (the shards hold {total} "
                              f"samples); {fix}")
    ordered = sorted(ranges)
    for (lo_a, hi_a, a), (lo_b, hi_b, b) in zip(ordered, ordered[1:]):
        if lo_b <= hi_a:
            raise CorpusError(f"{source}: the indices of {a} ({lo_a}..{hi_a}) and {b} ({lo_b}..{hi_b}) overlap, so "
                              f"some index names two pairs; {fix}")


@dataclass
class RecordCheck:
    """What :func:`verify_record` found: counts of the recorded shards, samples to drop, and the shards
    without an entry (to be checked sample by sample as they are decoded)."""
    urls: List[str]
    recorded: Dict[str, dict] = field(default_factory=dict)       # url -> entry
    unrecorded: List[str] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)           # url -> samples in the shard
    dropped: FrozenSet[Tuple[str, str]] = frozenset()              # (url, key) of empty captions to drop
    dropped_per_shard: Dict[str, int] = field(default_factory=dict)  # url -> how many of ``dropped`` it holds
    width: Optional[int] = None                                    # of the semantic embeddings
    semantic_from: Dict[str, str] = field(default_factory=dict)    # url -> "column" | "member" | "none"
    index_from: Dict[str, str] = field(default_factory=dict)       # url -> "json" | "column"
    legacy: List[str] = field(default_factory=list)                # urls whose column has no caption fingerprints
    rehashed: List[str] = field(default_factory=list)              # same size, new mtime, same keys (a copy)

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    def kept(self, url: str) -> int:
        return self.counts[url] - self.dropped_per_shard.get(url, 0)    # O(1): called once per shard


def verify_record(urls: Sequence[str], record: Optional[Mapping[str, dict]] = None, needs_index: bool = False,
                  needs_semantic: bool = False, column_dir=None,
                  expected_width: Optional[int] = None, expected_model: Optional[str] = None,
                  drop_empty_captions: bool = False, semantic_source: str = "precomputed",
                  batch_size: Optional[int] = None, workers: int = 1, world_size: int = 1,
                  resampled: bool = False, train_num_samples: Optional[int] = None,
                  source: str = "--train-data") -> RecordCheck:
    """Check the recorded shards in time proportional to their number (a stat each, a small json read
    where the record cannot vouch for a column), raising :class:`CorpusError` on the first problem.

    ``record``: {url or "NAME.tar": entry}; default: the records found beside the shards / column.
    Shard-level checks that need every shard (sizes, a batch per worker, index ranges) run only when
    every shard is recorded; otherwise they are left to the per-sample checks (see ``unrecorded``).

    A shard is the recorded one when its size and keys are: the same size and mtime says so at the cost
    of a stat; the same size with another mtime (a ``cp -r`` copy) re-hashes its keys by a walk over its
    tar headers; another size is another shard. ``column_dir``: a folder, or {url: folder}."""
    urls = list(urls)
    if record is None:
        entries = recorded_entries(urls, column_dir)
    else:
        by_name = {shard_name(k): v for k, v in record.items()}
        entries = {u: dict(by_name[shard_name(u)], _exact=True) for u in urls if shard_name(u) in by_name}
    check = RecordCheck(urls)
    empty: List[Tuple[str, str]] = []
    for url in urls:
        entry = entries.get(url)
        if entry is None or not os.path.isfile(url):
            check.unrecorded.append(url)
            continue
        _same_shard(url, entry, check)
        if entry.get("problems"):
            raise CorpusError(f"shard {url}: {entry['problems'][0]} (found by the last `data check`)")
        check.recorded[url] = entry
        check.counts[url] = int(entry["count"])
        empty.extend((url, key) for key in entry.get("empty_caption_keys", ()))
        if entry.get("empty_caption_keys"):
            check.dropped_per_shard[url] = len(entry["empty_caption_keys"])
    if empty and not drop_empty_captions:
        raise CorpusError(f"{source}: {len(empty)} of {check.samples} recorded samples have an empty or missing caption "
                          f"({listed([f'{u} sample {k}' for u, k in empty])}); write their captions, remove those "
                          f"samples, or pass {DROP_FLAG} to drop them")
    check.dropped = frozenset(empty)
    if needs_semantic and semantic_source != "on-the-fly":
        _verify_semantic(check, column_dir, expected_width, expected_model, semantic_source, source)
    if check.unrecorded:
        return check
    if needs_index:
        _verify_index(check, source)
    if train_num_samples is None:
        check_sizes_file(source, urls, check.counts)
    if batch_size is not None:
        check_batch_per_worker(source, [check.kept(u) for u in urls], batch_size, workers, world_size, resampled)
    return check


def _same_shard(url: str, entry: dict, check: RecordCheck) -> None:
    """The shard at ``url`` is the one ``entry`` records (see :func:`verify_record`), or a CorpusError
    saying what differs."""
    size, mtime = fingerprint(url)
    where = entry.get("_record", "its record")
    if size != entry.get("bytes"):
        if entry.get("_exact", True):
            raise CorpusError(f"shard {url} changed since it was checked: it has {size} bytes, {where} recorded "
                              f"{entry.get('bytes')}; {FIX_CHECK}")
        raise CorpusError(f"shard {url} has {size} bytes, but {where} holds an entry of {entry.get('bytes')} bytes for "
                          f"a shard of that name, found by name only (another folder's shard of the same name, or "
                          f"this one changed since that record was written); {FIX_CHECK} --out DIR_OF_ITS_OWN")
    if mtime == entry.get("mtime_ns"):
        return
    count, keys_hash = keys_sha256_of_shard(url)
    if keys_hash != entry.get("keys_sha256"):
        raise CorpusError(f"shard {url} has the size {where} records but other keys ({count} samples, recorded "
                          f"{entry.get('count')}): it was rewritten since it was checked; {FIX_CHECK}")
    check.rehashed.append(url)


def _verify_semantic(check: RecordCheck, column_dir, expected_width, expected_model, semantic_source, source) -> None:
    for url, entry in check.recorded.items():
        column = entry.get("column")
        if column is None or not _column_still_recorded(url, column_dir, column):
            # the record cannot vouch for a column here: read its json (small; not the array)
            npy_path, json_path = column_paths(url, column_dir)
            meta = read_column_meta(json_path)
            if meta is None and column is not None and column_folder(column_dir, url) is None:
                raise CorpusError(f"shard {url}: its column {json_path}, listed in {entry.get('_record', 'its record')}"
                                  f", is missing (deleted, or not copied with the shards); restore it, or {FIX_EMBED}")
            column = None
            if meta is not None:
                problem = column_problem(url, column_dir, meta=meta, shard_keys_hash=entry.get("keys_sha256"),
                                         shard_captions_hash=entry.get("captions_sha256"))
                if problem is not None:
                    raise CorpusError(problem)
                column = {"model": meta["model"], "dim": int(meta["dim"]), "rows": int(meta["count"]),
                          "index_start": meta.get("index_start"), "fingerprints": has_fingerprints(meta),
                          "dropped_empty_captions": len(meta.get("dropped_empty_captions", ()))}
                entry = dict(entry, column=column)
                check.recorded[url] = entry
        if column is not None and not column.get("fingerprints"):
            check.legacy.append(url)
        made, own = (column or {}).get("shard_captions_sha256"), entry.get("captions_sha256")
        if made and own and made != own:
            raise CorpusError(f"shard {url}: its column in {column.get('dir')} was made from other captions (same "
                              f"name, captions hash {made[:12]} in the column, {own[:12]} in the shard's record); "
                              f"{FIX_OTHER_SOURCE}, or {FIX_EMBED}")
        members = int(entry.get("emb_member_count") or 0)
        if column is not None:
            if column["rows"] + column.get("dropped_empty_captions", 0) != entry["count"]:
                raise CorpusError(f"shard {url}: its column has {column['rows']} rows and "
                                  f"{column.get('dropped_empty_captions', 0)} dropped samples for the shard's "
                                  f"{entry['count']} samples; {FIX_EMBED}")
            width, model = int(column["dim"]), column.get("model")
            check.semantic_from[url] = "column"
        elif members and (members >= check.kept(url) or semantic_source != "precomputed"):
            width, model = int(entry["emb_member_width"]), None
            check.semantic_from[url] = "member" if members >= check.kept(url) else "partial"
        else:
            check.semantic_from[url] = "none"
            if semantic_source == "precomputed":
                have = f"KEY.{EMB_MEMBER} in only {members} of its {entry['count']} samples" if members else \
                    f"no KEY.{EMB_MEMBER} members"
                raise CorpusError(f"--semantic-source precomputed: shard {url} has no embedding column "
                                  f"({column_paths(url, column_dir)[1]}) and {have}; {FIX_EMBED}, or pass "
                                  "--semantic-source auto to embed its batches on the fly")
            continue
        if check.width is not None and width != check.width:
            raise CorpusError(f"shard {url}: caption embeddings of width {width}, the shards before it width "
                              f"{check.width}; every embedding must come from one encoder: {FIX_EMBED}")
        check.width = width
        if expected_width is not None and width != expected_width:
            raise CorpusError(f"shard {url}: caption embeddings of width {width}, but the run's encoder "
                              f"{expected_model or ''} makes width {expected_width}; {FIX_EMBED} with that encoder")
        if model is not None and expected_model is not None and same_model(model, expected_model) is False:
            raise CorpusError(f"shard {url}: its column was made by {model}, but the run uses {expected_model}; "
                              f"{FIX_EMBED} --model {expected_model}")
        check_embedding_width(f"shard {url}", width, None, FIX_EMBED, model=model)


def _column_still_recorded(url: str, column_dir, column: dict) -> bool:
    """The column files are the ones the record describes (a stat each; no read): in the folder it
    names (resolved against the record), and the run's column folder, when given, is that folder."""
    given = column_folder(column_dir, url)
    if given is not None and column.get("dir") and os.path.abspath(given) != os.path.abspath(column["dir"]):
        return False
    npy_path, json_path = column_paths(url, given or column.get("dir"))
    try:
        return fingerprint(npy_path) == (column.get("npy_bytes"), column.get("npy_mtime_ns")) and \
            fingerprint(json_path) == (column.get("json_bytes"), column.get("json_mtime_ns"))
    except FileNotFoundError:
        return False


def _verify_index(check: RecordCheck, source: str) -> None:
    ranges: List[Tuple[int, int, str]] = []
    total = check.samples             # as the per-sample check counts: every sample of the shards
    for url in check.urls:
        entry = check.recorded[url]
        kept = check.kept(url)
        if not kept:
            continue
        column = entry.get("column") or {}
        if entry.get("index_scanned") and entry.get("index_count") == entry["count"]:
            if not entry.get("indices_unique", True):
                raise CorpusError(f"{source}: shard {url} holds samples sharing a KEY.json \"index\"; number the pairs "
                                  "0..N-1 once")
            ranges.append((int(entry["index_min"]), int(entry["index_max"]), f"shard {url}"))
            check.index_from[url] = "json"
        elif column.get("index_start") is not None:
            start = int(column["index_start"])
            ranges.append((start, start + int(column["rows"]) - 1, f"shard {url} (its column's index_start)"))
            check.index_from[url] = "column"
        else:
            raise CorpusError(f"{source}: the loss needs a per-pair dataset index, but shard {url} has no KEY.json "
                              f"\"index\" in every sample and no embedding column recording where its numbering "
                              "starts; run `openclip-align embed --data SHARDS` over all training shards together")
    check_index_ranges(source, ranges, total)
