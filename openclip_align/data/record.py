"""The record a shard folder carries, ``openclip_align_record.json``: what each shard holds.

Per shard: count, a hash of its keys and of its captions, index range, empty captions, caption
embedding members (:data:`.column.EMB_MEMBER`), its column (:mod:`.column`), with the shard's size and
mtime so that a changed shard is noticed. Written by ``data build``, ``embed`` and ``data check``
(:func:`scan_shards`, :class:`RecordWriter`); read by the trainer's check before step 1
(:mod:`.preflight`). Paths in it (a shard's ``path``, its
column's ``dir``) are relative to the record, so a copied or moved corpus is checked against its own
files; older records with absolute dirs still work.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from openclip_align.atomic_files import atomic_write_bytes

from .captions import is_empty
from .column import EMB_MEMBER, caption_fingerprint, captions_sha256, check_vector, column_folder, column_summary
from .errors import CorpusError
from .shard_files import SHOWN, caption_text, compact_json_bytes, fingerprint, index_of, iter_samples, \
    keys_sha256, read_json, shard_name

RECORD_NAME = "openclip_align_record.json"
RECORD_FORMAT = "openclip-align-record/1"
FIX_CHECK = "rerun `openclip-align data check --data SHARDS`"


def scan_shard(path: str, want_index: bool = True, column_dir: Optional[str] = None) -> dict:
    """One record entry for the shard at ``path`` (see the module docstring). Reads only the captions,
    the KEY.json (``want_index``) and caption embedding members, seeking over the images."""
    size, mtime = fingerprint(path)
    wanted = frozenset({"txt", EMB_MEMBER} | ({"json"} if want_index else set()))
    keys: List[str] = []
    empty: List[str] = []
    indices: List[int] = []
    seen: set = set()
    unique = True
    emb_count, emb_width, emb_finite = 0, None, None
    problems: List[str] = []
    caption_fps: List[bytes] = []
    for key, members in iter_samples(path, wanted):
        keys.append(key)
        caption_fps.append(caption_fingerprint(caption_text(members.get("txt"))))
        if is_empty(members.get("txt")):
            empty.append(key)
        if want_index:
            index = index_of(members.get("json"))
            if index is not None:
                unique = unique and index not in seen
                seen.add(index)
                indices.append(index)
        raw = members.get(EMB_MEMBER)
        if raw is not None:
            emb_count += 1
            try:
                emb_width = check_vector(f"{path} sample {key}", raw, emb_width)
                emb_finite = True if emb_finite is None else emb_finite
            except CorpusError as err:
                problems.append(str(err))
                if "non-finite" in str(err):
                    emb_finite = False
    entry = {
        "bytes": size, "mtime_ns": mtime, "count": len(keys), "keys_sha256": keys_sha256(keys),
        "captions_sha256": captions_sha256(caption_fps),
        "index_scanned": bool(want_index), "index_count": len(indices),
        "index_min": min(indices) if indices else None, "index_max": max(indices) if indices else None,
        "indices_unique": unique, "empty_caption_keys": empty,
        "has_emb_member": emb_count > 0, "emb_member_count": emb_count,
        "emb_member_width": emb_width, "emb_member_finite": emb_finite,
        "problems": problems[:SHOWN] + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else []),
        "column": None,
    }
    column = column_summary(path, column_dir, shard_keys=keys, shard_captions_hash=entry["captions_sha256"])
    if column is not None:
        entry["column"] = column
    return entry


def read_record(directory: str) -> Optional[dict]:
    """The record in ``directory``, or None when there is none."""
    path = os.path.join(str(directory), RECORD_NAME)
    record = read_json(path, FIX_CHECK)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("shards"), dict):
        raise CorpusError(f"{path} is not an openclip-align record (format {RECORD_FORMAT!r}); delete it and {FIX_CHECK}")
    return record


def _relative_entry(key: str, entry: dict, directory: str) -> dict:
    """An entry as stored: the shard's ``path`` (when ``key`` is a path) and its column's ``dir`` relative
    to the record's folder, so a copied or moved corpus finds its own files; no private (``_``) fields."""
    base = os.path.abspath(directory)
    entry = {k: v for k, v in entry.items() if not k.startswith("_")}
    if os.path.dirname(str(key)):
        entry["path"] = os.path.relpath(os.path.abspath(str(key)), base)
    column = entry.get("column")
    if isinstance(column, dict) and column.get("dir") and os.path.isabs(column["dir"]):
        entry["column"] = dict(column, dir=os.path.relpath(column["dir"], base))
    return entry


def write_record(directory: str, entries: Mapping[str, dict], replace: bool = False) -> dict:
    """Merge ``entries`` ({"NAME.tar" or shard path: entry}) into the directory's record (all of it with
    ``replace``), under a lock so that concurrent writers lose nothing; written atomically. Paths are
    stored relative to ``directory`` (see :func:`_relative_entry`)."""
    from filelock import FileLock

    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RECORD_NAME)
    with FileLock(path + ".lock"):
        record = None if replace else read_record(directory)
        record = record or {"format": RECORD_FORMAT, "shards": {}}
        record["shards"].update({shard_name(k): _relative_entry(k, v, directory) for k, v in entries.items()})
        record["shards"] = dict(sorted(record["shards"].items()))
        atomic_write_bytes(path, compact_json_bytes(record))
    return record


def writable_dir(directory: str) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def record_dir_for(shard_dir: str, column_dir: Optional[str] = None) -> str:
    """Where a writer puts the record: beside the shards, else beside the column."""
    if writable_dir(shard_dir):
        return shard_dir
    if column_dir is not None and (writable_dir(column_dir) or not os.path.exists(column_dir)):
        return column_dir
    raise CorpusError(f"{shard_dir} is not writable, so the record {RECORD_NAME} cannot go beside the shards; pass "
                      "--out DIR (a writable directory) to write it there")


def _resolved_entry(url: str, entry: dict, folder: str) -> Optional[dict]:
    """The entry with absolute paths, or None when it records another shard of the same name (its
    ``path``, relative to the record, is not ``url``). ``_exact``: the entry is this very file's (by path,
    or by name in the record beside it); ``_record``: the record's path, for messages."""
    base = os.path.abspath(folder)
    exact = os.path.abspath(os.path.dirname(url)) == base
    if entry.get("path"):
        if os.path.normpath(os.path.join(base, entry["path"])) != os.path.abspath(url):
            return None
        exact = True
    entry = dict(entry, _exact=exact, _record=os.path.join(folder, RECORD_NAME))
    column = entry.get("column")
    if isinstance(column, dict) and column.get("dir"):
        entry["column"] = dict(column, dir=os.path.normpath(os.path.join(base, column["dir"])))
    return entry


def recorded_entries(urls: Sequence[str], column_dir=None) -> Dict[str, dict]:
    """{url: entry} for the shards with an entry, looking in the shard's column folder first (``column_dir``:
    a folder or {url: folder}), then beside each shard. An entry whose recorded path is another file of
    the same name is not this shard's."""
    records: Dict[str, Optional[dict]] = {}

    def record_in(folder: str) -> Optional[dict]:
        if folder not in records:
            records[folder] = read_record(folder)
        return records[folder]

    found: Dict[str, dict] = {}
    for url in urls:
        name = shard_name(url)
        first = column_folder(column_dir, url)
        for folder in ([first] if first else []) + [os.path.dirname(url)]:
            record = record_in(folder)
            if record is not None and name in record["shards"]:
                entry = _resolved_entry(url, record["shards"][name], folder)
                if entry is not None:
                    found[url] = entry
                    break
    return found


def recorded_entries_by_folder(paths: Sequence[str], folder_of) -> Dict[str, dict]:
    """:func:`recorded_entries` for shards whose record folder is ``folder_of(path)``: each folder's record
    is read once (not once per shard: a record of N shards read N times is N^2 at LAION's 40k shards)."""
    groups: Dict[str, List[str]] = {}
    for path in paths:
        groups.setdefault(folder_of(path), []).append(path)
    found: Dict[str, dict] = {}
    for folder, group in groups.items():
        found.update(recorded_entries(group, folder))
    return found


def _scan_task(job: Tuple[str, bool, Optional[str]]) -> Tuple[str, Optional[dict], Optional[str]]:
    path, want_index, column_dir = job
    try:
        return path, scan_shard(path, want_index=want_index, column_dir=column_dir), None
    except CorpusError as err:
        return path, None, str(err)


def scan_shards(paths: Sequence[str], workers: int = 1, column_dir: Optional[str] = None,
                known: Optional[Mapping[str, dict]] = None, on_entry=None, progress: bool = False):
    """{path: entry} and {path: error} for many shards, one shard per task in ``workers`` processes.

    ``known`` ({path: entry}): entries reused as they are when the shard's bytes and mtime still match
    (a rerun skips what was checked). ``on_entry(path, entry)`` is called as each scan finishes, so the
    caller can record incrementally."""
    entries: Dict[str, dict] = {}
    errors: Dict[str, str] = {}
    todo = []
    for path in paths:
        entry = (known or {}).get(path)
        if entry is not None and fingerprint(path) == (entry.get("bytes"), entry.get("mtime_ns")) \
                and entry.get("index_scanned") and entry.get("captions_sha256"):
            entries[path] = entry
        else:
            todo.append((path, True, column_dir))
    if not todo:
        return entries, errors
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="scan shards", unit="shard", disable=not progress)
    if workers > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_scan_task, todo, chunksize=1)
            for path, entry, error in results:
                _collect(path, entry, error, entries, errors, on_entry)
                bar.update(1)
    else:
        for job in todo:
            _collect(*_scan_task(job), entries, errors, on_entry)
            bar.update(1)
    bar.close()
    return entries, errors


def _collect(path, entry, error, entries, errors, on_entry) -> None:
    if error is not None:
        errors[path] = error
        return
    entries[path] = entry
    if on_entry is not None:
        on_entry(path, entry)


class RecordWriter:
    """Writes record entries as they come, at most every ``every_s`` seconds (and on ``flush``), so an
    interrupted scan keeps what it had finished."""

    def __init__(self, directory: str, every_s: float = 5.0):
        self.directory, self.every_s = directory, every_s
        self.pending: Dict[str, dict] = {}
        self.last = time.monotonic()

    def add(self, path: str, entry: dict) -> None:
        self.pending[shard_name(path)] = entry
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            write_record(self.directory, self.pending)
            self.pending = {}
        self.last = time.monotonic()
