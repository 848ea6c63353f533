"""What a training corpus carries beside its webdataset shards, and how it is verified.

The one owner of the files the data commands write and the trainer checks (the trainer only calls this):

* an embedding column per shard, ``COLDIR/NAME.emb.npy`` ([n, d], row r = the r-th captioned sample of
  ``NAME.tar`` in tar order) and ``COLDIR/NAME.emb.json`` (its keys, model, width, ``index_start``: the
  dataset index of row 0, and the shard it was made from: path, size, sample count, a hash of its keys
  and of its captions). The json is written after the array, so a json that exists vouches for a
  complete column. Caption embeddings never need a copy of the images.
* a record per shard directory, ``openclip_align_record.json``: what each shard holds (count, a hash of
  its keys and of its captions, index range, empty captions, ``KEY.emb.npy`` members, its column), with
  the shard's size and mtime so that a changed shard is noticed. Written by ``data build``, ``embed`` and
  ``data check``. Paths in it (a shard's ``path``, its column's ``dir``) are relative to the record, so a
  copied or moved corpus is checked against its own files; older records with absolute dirs still work.

A column row belongs to a caption, not to a file name: two img2dataset exports both hold ``00000.tar``
with keys ``000000000``..., and one shard may be embedded from a local copy and trained from ``pipe:``.
So every row carries its caption's fingerprint (:func:`caption_fingerprint`, 8 bytes), compared with
the caption of the sample it is joined to as that sample is decoded (:class:`ColumnReader`): a column
made from other captions stops the run at the first affected sample, local, ``pipe:`` or remote alike.
Columns written before fingerprints existed still train (a warning says how to add them:
:data:`FIX_FINGERPRINTS`).

Verifying a recorded corpus (:func:`verify_record`) costs a stat and, at most, a small json read per
shard: nothing grows with the number of samples. Shards without a record entry are checked sample by
sample as they are decoded (:func:`check_vector`, :class:`ColumnReader`). Every problem raises
:class:`CorpusError` in one line naming the shard, the key and the fix.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from openclip_align.atomic_files import atomic_write_bytes

from .captions import DROP_FLAG, is_empty

COLUMN_SUFFIX = ".emb.npy"
COLUMN_META_SUFFIX = ".emb.json"
RECORD_NAME = "openclip_align_record.json"
COLUMN_FORMAT = "openclip-align-embedding-column/1"
RECORD_FORMAT = "openclip-align-record/1"
EMB_MEMBER = "emb.npy"                  # today's per-sample member holding a caption embedding
CORPUS_META = "embeddings.json"         # corpus-wide {"model", "dim", ...} beside shards or columns
SIZES_FILE = "sizes.json"               # where upstream reads shard sizes
SHOWN = 3

FIX_EMBED = "rerun `openclip-align embed --data SHARDS` (it writes the column NAME.emb.npy/.emb.json)"
FIX_CHECK = "rerun `openclip-align data check --data SHARDS`"
FIX_FINGERPRINTS = "openclip-align embed --data SHARDS [--out COLDIR] --add-fingerprints"
FIX_OTHER_SOURCE = ("give each source its own columns: `openclip-align embed --data SOURCE --out DIR` per source, "
                    "then --semantic-embeddings DIR_A::DIR_B in the order of --train-data's :: sources")
CAPTION_FP_BYTES = 8

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")      # webdataset's KEY.suffix split of a member name
REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")       # a url or pipe: command, not a local path
_SHARD_NAME = re.compile(r"([^/\s]+?\.tar)(?=\s|$|\?)")  # the shard file name inside a url or pipe: command


class CorpusError(ValueError):
    """The corpus cannot be trained on as it is; the message names the shard, the sample and the fix."""


def listed(labels: Sequence[str], shown: int = SHOWN) -> str:
    return ", ".join(labels[:shown]) + (f" and {len(labels) - shown} more" if len(labels) > shown else "")


# --- names ------------------------------------------------------------------------------------------
def shard_name(shard_url: str) -> str:
    """``NAME.tar`` of a local path, a URL or a ``pipe:`` command (the last ``*.tar`` it names)."""
    found = _SHARD_NAME.findall(str(shard_url))
    return found[-1] if found else os.path.basename(str(shard_url).rstrip("/"))


def column_folder(column_dir, shard_url: str) -> Optional[str]:
    """The column folder given for a shard: ``column_dir`` itself, or its entry for the shard when it is a
    mapping {url: folder} (``--semantic-embeddings A::B`` pairs folders with ``--train-data``'s sources)."""
    if isinstance(column_dir, Mapping):
        found = column_dir.get(str(shard_url))
        return str(found) if found else None
    return str(column_dir) if column_dir else None


def column_paths(shard_url: str, column_dir=None) -> Tuple[str, str]:
    """(``NAME.emb.npy``, ``NAME.emb.json``) of a shard's column: in ``column_dir`` (a folder, or
    {url: folder}), else beside the shard."""
    name = shard_name(shard_url)
    stem = name[:-len(".tar")] if name.endswith(".tar") else name
    folder = column_folder(column_dir, shard_url) or os.path.dirname(str(shard_url))
    return os.path.join(folder, stem + COLUMN_SUFFIX), os.path.join(folder, stem + COLUMN_META_SUFFIX)


def keys_sha256(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def caption_fingerprint(caption) -> bytes:
    """8 bytes of blake2b of a caption as the trainer sees it (the UTF-8 text of ``KEY.txt``; a missing
    caption counts as empty). Cost: one hash of a short string per sample."""
    if caption is None:
        caption = b""
    elif isinstance(caption, str):
        caption = caption.encode("utf-8")
    return hashlib.blake2b(bytes(caption), digest_size=CAPTION_FP_BYTES).digest()


def captions_sha256(fingerprints: Iterable[bytes]) -> str:
    """One hash of a shard's captions: sha256 over their fingerprints in tar order."""
    digest = hashlib.sha256()
    for fp in fingerprints:
        digest.update(fp)
    return digest.hexdigest()


def caption_text(raw) -> str:
    """``KEY.txt`` bytes (or an already decoded str) as the text webdataset's decoder gives the trainer."""
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)


def keys_sha256_of_shard(path: str) -> Tuple[int, str]:
    """(sample count, keys hash) of a local shard by a walk over its tar headers (no member is read)."""
    keys = [key for key, _ in iter_samples(path, frozenset())]
    return len(keys), keys_sha256(keys)


def fingerprint(path: str) -> Tuple[int, int]:
    """(bytes, mtime_ns): what tells that a file changed since it was recorded."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


# --- reading shards -----------------------------------------------------------------------------------
def iter_samples(path: str, wanted: FrozenSet[str]) -> Iterator[Tuple[str, Dict[str, Optional[bytes]]]]:
    """(key, {suffix: bytes, or None when not wanted}) per sample, in tar order, keys as webdataset forms
    them. Members not in ``wanted`` (images) are never read: tarfile seeks over them."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
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
        where = f"after sample {key}" if key is not None else "at its start"
        raise CorpusError(f"shard {path} cannot be read to its end {where} ({err}); it is damaged or truncated: "
                          "rebuild or re-download it") from err
    if key is not None:
        yield key, members


def index_of(raw: Optional[bytes]) -> Optional[int]:
    """The integer ``"index"`` of a KEY.json, or None."""
    try:
        value = json.loads(raw).get("index") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_vector(where: str, value, width: Optional[int], fix: str = FIX_EMBED) -> int:
    """A caption embedding (``.npy`` bytes or an array) is a finite 1-D float vector of ``width``; its width."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = np.load(io.BytesIO(value), allow_pickle=False)
        except Exception as err:
            raise CorpusError(f"{where}: KEY.{EMB_MEMBER} is not a readable .npy array ({err}); {fix}") from err
    value = np.asarray(value)
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.floating):
        raise CorpusError(f"{where}: the caption embedding must be a 1-D floating point vector, got shape "
                          f"{value.shape} and dtype {value.dtype}; {fix}")
    if width is not None and value.shape[0] != width:
        raise CorpusError(f"{where}: the caption embedding has width {value.shape[0]}, expected {width}; every "
                          f"embedding must come from one encoder: {fix}")
    if not np.isfinite(value).all():
        raise CorpusError(f"{where}: the caption embedding holds non-finite values (NaN or inf); {fix}")
    return int(value.shape[0])


def scan_shard(path: str, want_index: bool = True, column_dir: Optional[str] = None) -> dict:
    """One record entry for the shard at ``path`` (see the module docstring). Reads only the captions,
    the KEY.json (``want_index``) and KEY.emb.npy members, seeking over the images."""
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


# --- the embedding column -----------------------------------------------------------------------------
def shard_identity(shard_path: str, shard_keys: Sequence[str], shard_captions: Optional[Sequence[str]],
                   column_dir=None) -> dict:
    """What a column json records of the shard it was made from (see the module docstring). A local
    shard's path is stored relative to the column's folder, so a copied corpus names its own shard."""
    local = os.path.isfile(str(shard_path))
    folder = os.path.dirname(os.path.abspath(column_paths(shard_path, column_dir)[1]))
    return {"shard": shard_name(shard_path),
            "shard_path": os.path.relpath(os.path.abspath(shard_path), folder) if local else str(shard_path),
            "shard_count": len(shard_keys), "shard_keys_sha256": keys_sha256(shard_keys),
            "shard_captions_sha256": None if shard_captions is None else
            captions_sha256(caption_fingerprint(c) for c in shard_captions)}


def write_column(shard_path: str, column_dir: Optional[str], keys: Sequence[str], embeddings: np.ndarray,
                 model: str, dtype: str = "float16", dropped: Sequence[str] = (),
                 index_start: Optional[int] = None, shard_keys: Optional[Sequence[str]] = None,
                 captions: Optional[Sequence[str]] = None, shard_captions: Optional[Sequence[str]] = None) -> dict:
    """Write a shard's column: the array first, then its json (so an existing json means complete).

    ``keys``: the samples of the rows, in tar order; ``dropped``: samples left out (no row);
    ``shard_keys``: every key of the shard in tar order (default ``keys`` + none dropped);
    ``captions``: the caption of each row, as the trainer will see it (each row's fingerprint);
    ``shard_captions``: every sample's caption in tar order (default ``captions`` when none is dropped).
    Without ``captions`` the column has no fingerprints (it trains, with a warning)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(keys):
        raise ValueError(f"{shard_path}: {len(keys)} keys but embeddings of shape {embeddings.shape}")
    if captions is not None and len(captions) != len(keys):
        raise ValueError(f"{shard_path}: {len(keys)} keys but {len(captions)} captions")
    if shard_captions is None and captions is not None and not dropped:
        shard_captions = captions
    npy_path, json_path = column_paths(shard_path, column_dir)
    size, mtime = fingerprint(shard_path)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)), allow_pickle=False)
    # a rerun replaces the json last: remove the old one first so no json ever vouches for a new array
    if os.path.exists(json_path):
        os.unlink(json_path)
    atomic_write_bytes(npy_path, buf.getvalue())
    meta = {"format": COLUMN_FORMAT, "shard_bytes": size, "shard_mtime_ns": mtime,
            **shard_identity(shard_path, shard_keys if shard_keys is not None else keys, shard_captions, column_dir),
            "count": len(keys), "dim": int(embeddings.shape[1]), "dtype": str(np.dtype(dtype)), "model": str(model),
            "normalized": True, "index_start": index_start, "keys": list(keys),
            "dropped_empty_captions": list(dropped)}
    if captions is not None:
        meta["caption_fingerprints"] = encode_fingerprints(captions)
    atomic_write_bytes(json_path, _json_bytes(meta))
    return meta


def encode_fingerprints(captions: Iterable[str]) -> str:
    """The rows' caption fingerprints as the json stores them: one base64 string of 8 bytes per row
    (about 11 bytes of json per sample)."""
    return base64.b64encode(b"".join(caption_fingerprint(c) for c in captions)).decode("ascii")


def write_column_meta(json_path: str, meta: dict) -> None:
    """Replace a column's json atomically (the array is left as it is)."""
    atomic_write_bytes(json_path, _json_bytes(meta))


def column_source(meta: dict, json_path: str) -> Optional[str]:
    """The shard a column was made from: an absolute path (resolved against the column's folder), a url
    or ``pipe:`` command as given, or None for a column that does not record it."""
    source = meta.get("shard_path")
    if not source or REMOTE.match(str(source)) or os.path.isabs(str(source)):
        return source
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(json_path)), str(source)))


def made_from(meta: dict, json_path: str) -> str:
    """Where a column says it was made from, for messages."""
    return str(column_source(meta, json_path) or f"a shard named {meta.get('shard')}")


def has_fingerprints(meta: Optional[dict]) -> bool:
    return bool(meta) and meta.get("caption_fingerprints") is not None


def _read_json(path: str, fix: str):
    """The json at ``path``, or None when there is no file; a damaged file is named with ``fix``."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise CorpusError(f"{path} is not valid json ({err}); delete it and {fix}") from err


def read_column_meta(json_path: str) -> Optional[dict]:
    """A column's json, or None when it does not exist (the column is then missing or incomplete)."""
    meta = _read_json(json_path, FIX_EMBED)
    if meta is None:
        return None
    if not isinstance(meta, dict) or meta.get("format") != COLUMN_FORMAT:
        raise CorpusError(f"{json_path} is not an embedding column's json (no format {COLUMN_FORMAT!r}); {FIX_EMBED}")
    return meta


def npy_shape(npy_path: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header (memory-mapped: the rows are not read)."""
    array = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    return tuple(array.shape), array.dtype


def column_problem(shard_path: str, column_dir: Optional[str], meta: Optional[dict] = None,
                   shard_keys_hash: Optional[str] = None, expected_width: Optional[int] = None,
                   check_stat: bool = True, shard_captions_hash: Optional[str] = None) -> Optional[str]:
    """Why the shard's column cannot be used as it is (missing, partial, another shard's, stale, wrong
    width), or None. Costs a stat, a .npy header and the json (``meta`` when already read).
    ``shard_keys_hash`` / ``shard_captions_hash``: the shard's own (from its record), when known."""
    npy_path, json_path = column_paths(shard_path, column_dir)
    name = shard_name(shard_path)
    if meta is None:
        meta = read_column_meta(json_path)
    if meta is None:
        if os.path.exists(npy_path):
            return f"shard {shard_path}: its column {npy_path} has no {os.path.basename(json_path)}: it is incomplete " \
                   f"(an interrupted embed); {FIX_EMBED}"
        return f"shard {shard_path}: no embedding column ({json_path} does not exist); {FIX_EMBED}" + \
               (", or pass --semantic-embeddings DIR where it was written" if column_dir is None else "")
    if meta.get("shard") != name:
        return f"{json_path} is the column of shard {meta.get('shard')}, not of {name}; {FIX_EMBED}"
    source = column_source(meta, json_path)
    same_file = source is None or (os.path.isfile(str(shard_path)) and os.path.abspath(shard_path) == source)
    other = "" if same_file else f" (it was made from {source}: another shard of that name? {FIX_OTHER_SOURCE})"
    if check_stat and os.path.isfile(shard_path):
        size, mtime = fingerprint(shard_path)
        if meta.get("shard_bytes") != size:
            if same_file:
                return f"shard {shard_path} has {size} bytes, but its column {json_path} was made from it when it " \
                       f"had {meta.get('shard_bytes')} bytes: the shard changed since; {FIX_EMBED}"
            return f"shard {shard_path} has {size} bytes, but its column {json_path} was made from {source} of " \
                   f"{meta.get('shard_bytes')} bytes: another shard of the same name, or a changed copy; " \
                   f"{FIX_OTHER_SOURCE}, or {FIX_EMBED}"
    if shard_keys_hash is not None and meta.get("shard_keys_sha256") != shard_keys_hash:
        return f"{json_path}: its keys are not those of shard {shard_path} (another version of the shard){other}; " \
               f"{FIX_EMBED}"
    recorded_captions = meta.get("shard_captions_sha256")
    if shard_captions_hash is not None and recorded_captions is not None and recorded_captions != shard_captions_hash:
        return f"shard {shard_path}: its column {json_path} was made from other captions (same keys, captions hash " \
               f"{recorded_captions[:12]} in the column, {shard_captions_hash[:12]} in the shard's record){other}; " \
               + (FIX_OTHER_SOURCE if other else FIX_EMBED)
    try:
        shape, _ = npy_shape(npy_path)
    except FileNotFoundError:
        return f"{json_path} exists but {npy_path} does not; {FIX_EMBED}"
    except Exception as err:
        return f"{npy_path} is not a readable .npy array ({err}); {FIX_EMBED}"
    if len(shape) != 2 or shape[0] != meta.get("count") or shape[0] != len(meta.get("keys", ())) \
            or shape[1] != meta.get("dim"):
        return f"{npy_path} has shape {shape}, but {json_path} lists {len(meta.get('keys', ()))} keys of width " \
               f"{meta.get('dim')}; the two files do not belong together: {FIX_EMBED}"
    if expected_width is not None and shape[1] != expected_width:
        return f"shard {shard_path}: its column {npy_path} has width {shape[1]}, expected {expected_width} " \
               f"(another encoder made it); {FIX_EMBED} with the encoder the run uses"
    return None


def column_summary(shard_path: str, column_dir, shard_keys: Optional[Sequence[str]] = None,
                   meta: Optional[dict] = None, shard_captions_hash: Optional[str] = None) -> Optional[dict]:
    """The record's ``column`` field for a complete, current column; None when there is none usable."""
    npy_path, json_path = column_paths(shard_path, column_dir)
    try:
        meta = meta if meta is not None else read_column_meta(json_path)
    except CorpusError:
        return None
    if meta is None:
        return None
    shard_hash = keys_sha256(shard_keys) if shard_keys is not None else None
    if column_problem(shard_path, column_dir, meta=meta, shard_keys_hash=shard_hash,
                      shard_captions_hash=shard_captions_hash) is not None:
        return None
    npy_bytes, npy_mtime = fingerprint(npy_path)
    json_bytes, json_mtime = fingerprint(json_path)
    return {"model": meta["model"], "dim": int(meta["dim"]), "dtype": meta["dtype"], "rows": int(meta["count"]),
            "index_start": meta.get("index_start"), "dropped_empty_captions": len(meta.get("dropped_empty_captions", ())),
            "dir": os.path.abspath(os.path.dirname(npy_path)), "npy_bytes": npy_bytes, "npy_mtime_ns": npy_mtime,
            "json_bytes": json_bytes, "json_mtime_ns": json_mtime, "fingerprints": has_fingerprints(meta),
            "shard_keys_sha256": meta.get("shard_keys_sha256"),
            "shard_captions_sha256": meta.get("shard_captions_sha256")}


class _OpenColumn:
    def __init__(self, shard_url: str, npy_path: str, meta: dict, array: np.ndarray):
        self.shard_url, self.npy_path, self.meta, self.array = shard_url, npy_path, meta, array
        self.rows = {key: row for row, key in enumerate(meta["keys"])}
        self.dropped = frozenset(meta.get("dropped_empty_captions", ()))
        encoded = meta.get("caption_fingerprints")
        self.fingerprints = None if encoded is None else base64.b64decode(encoded)
        if self.fingerprints is not None and len(self.fingerprints) != CAPTION_FP_BYTES * len(self.rows):
            raise CorpusError(f"{npy_path}: its json holds {len(self.fingerprints) // CAPTION_FP_BYTES} caption "
                              f"fingerprints for {len(self.rows)} rows; the json is damaged: {FIX_EMBED}")


_LEGACY_WARNED = False          # once per process: a column without fingerprints


def legacy_warning(where: str) -> str:
    """What the log says of columns without caption fingerprints: what is lost, and the command that adds them."""
    return (f"{where} carries no caption fingerprints (written before they existed), so its rows cannot be checked "
            f"against the captions they are joined to; add them (reads captions only, rewrites the column json): "
            f"{FIX_FINGERPRINTS}")


def warn_legacy_columns(where: str) -> None:
    """:func:`legacy_warning`, once per process."""
    global _LEGACY_WARNED
    if not _LEGACY_WARNED:
        _LEGACY_WARNED = True
        logging.warning("openclip-align: %s", legacy_warning(where))


class ColumnReader:
    """Looks up a sample's caption embedding in its shard's column, opened lazily (memory-mapped) in the
    process that asks: picklable before use, so each dataloader worker opens its own. Keeps the last
    ``cache_size`` shards open (a shuffle buffer mixes samples of a few shards).

    ``column_dir``: one folder, or {url: folder}; None: beside each shard. Given the sample's caption,
    each lookup compares its fingerprint with the row's (a hash of a short string), so a row is never
    joined to a sample whose caption it was not made from. ``warn_legacy``: say (once per process) when a
    column has no fingerprints; off when the run already said so before step 1."""

    def __init__(self, column_dir=None, expected_width: Optional[int] = None,
                 expected_model: Optional[str] = None, cache_size: int = 8, warn_legacy: bool = True):
        self.column_dir = column_dir
        self.expected_width = expected_width
        self.expected_model = expected_model
        self.cache_size = max(1, int(cache_size))
        self.warn_legacy = warn_legacy
        self._open: "collections.OrderedDict[str, _OpenColumn]" = collections.OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = collections.OrderedDict()          # memory maps stay in the process that opened them
        return state

    def column(self, shard_url: str) -> _OpenColumn:
        col = self._open.get(shard_url)
        if col is not None:
            self._open.move_to_end(shard_url)
            return col
        problem = column_problem(shard_url, self.column_dir, expected_width=self.expected_width)
        if problem is not None:
            raise CorpusError(problem)
        npy_path, json_path = column_paths(shard_url, self.column_dir)
        meta = read_column_meta(json_path)
        if self.expected_model is not None and _same_model(meta.get("model"), self.expected_model) is False:
            raise CorpusError(f"shard {shard_url}: its column {npy_path} was made by {meta.get('model')}, but the run "
                              f"uses {self.expected_model}; {FIX_EMBED} --model {self.expected_model}")
        col = _OpenColumn(shard_url, npy_path, meta, np.load(npy_path, mmap_mode="r", allow_pickle=False))
        if col.fingerprints is None and self.warn_legacy:
            warn_legacy_columns(f"the column {json_path}")
        self._open[shard_url] = col
        while len(self._open) > self.cache_size:
            self._open.popitem(last=False)
        return col

    def _row(self, shard_url: str, key: str, caption=None) -> Tuple[_OpenColumn, int]:
        try:
            col = self.column(shard_url)
        except CorpusError as err:
            raise CorpusError(f"{err} (met at sample {key})") from None
        row = col.rows.get(key)
        if row is None:
            why = "was left out for its empty caption" if key in col.dropped else "has no row"
            raise CorpusError(f"shard {shard_url} sample {key} {why} in the column {col.npy_path} ({col.meta['count']} "
                              f"rows); {FIX_EMBED}" + (f", or pass {DROP_FLAG}" if key in col.dropped else ""))
        if caption is not None and col.fingerprints is not None \
                and caption_fingerprint(caption_text(caption)) != \
                col.fingerprints[CAPTION_FP_BYTES * row:CAPTION_FP_BYTES * (row + 1)]:
            text = caption_text(caption)
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise CorpusError(
                f"shard {shard_url} sample {key}: its caption {shown!r} is not the caption row {row} of "
                f"{col.npy_path} was made from (that column was made from {made_from(col.meta, col.npy_path)}): "
                f"the column of another shard with the same name and keys, or this shard's captions changed since "
                f"it was embedded; {FIX_OTHER_SOURCE}, or {FIX_EMBED}")
        return col, row

    def lookup(self, shard_url: str, key: str, caption=None) -> np.ndarray:
        """float32 [d] embedding of ``key``; raises :class:`CorpusError` naming shard, key and fix.
        ``caption``: the sample's caption, checked against the row's fingerprint."""
        col, row = self._row(shard_url, key, caption)
        value = np.asarray(col.array[row], dtype=np.float32)
        if not np.isfinite(value).all():
            raise CorpusError(f"shard {shard_url} sample {key}: row {row} of {col.npy_path} holds non-finite values "
                              f"(NaN or inf); {FIX_EMBED}")
        return value

    def index(self, shard_url: str, key: str, caption=None) -> int:
        """The sample's dataset index: the column's ``index_start`` + its row."""
        col, row = self._row(shard_url, key, caption)
        start = col.meta.get("index_start")
        if start is None:
            raise CorpusError(f"shard {shard_url}: its column {col.npy_path} records no index_start; {FIX_EMBED} "
                              "over all training shards together")
        return int(start) + row


def _same_model(a: Optional[str], b: Optional[str]) -> Optional[bool]:
    from .semantic import canonical_name

    if not a or not b:
        return None
    return canonical_name(a) == canonical_name(b) or os.path.basename(str(a)) == os.path.basename(str(b))


# --- the record -----------------------------------------------------------------------------------------
def read_record(directory: str) -> Optional[dict]:
    """The record in ``directory``, or None when there is none."""
    path = os.path.join(str(directory), RECORD_NAME)
    record = _read_json(path, FIX_CHECK)
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
        atomic_write_bytes(path, _json_bytes(record))
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


# --- checks shared by the record check and the per-sample checks ---------------------------------------
def metadata_width(meta_path: str) -> Tuple[Optional[int], Optional[str]]:
    """(dim, model) recorded by ``embed`` / ``data build``; (None, None) without a file."""
    if not os.path.isfile(meta_path):
        return None, None
    with open(meta_path) as fh:
        meta = json.load(fh)
    dim = meta.get("dim")
    return (int(dim) if dim is not None else None), meta.get("model")


def check_embedding_width(source: str, width: int, meta_path: Optional[str], fix: str, model: Optional[str] = None) -> None:
    """``width`` is usable and agrees with the metadata beside the embeddings and the encoder it names."""
    from .semantic import ENCODER_WIDTHS, canonical_name

    if width < 2:
        raise CorpusError(
            f"{source}: semantic embeddings of width {width}; a 1-wide normalised embedding is +-1, so every "
            f"pair would look alike or opposite and the semantic term would carry no information. {fix}")
    dim, recorded = metadata_width(meta_path) if meta_path else (None, None)
    if dim is not None and dim != width:
        raise CorpusError(f"{source}: embeddings of width {width}, but {meta_path} records width {dim}; "
                          f"the two files do not belong together. {fix}")
    name = model or recorded
    expected = ENCODER_WIDTHS.get(canonical_name(name)) if name else None
    if expected is not None and expected != width:
        raise CorpusError(f"{source}: embeddings of width {width}, but {meta_path or 'the column'} names the encoder "
                          f"{name}, whose embeddings have width {expected}. {fix}")


def encoder_width(model: str) -> int:
    """Width of an encoder's embeddings (loads it unless it is a bundled one)."""
    from .semantic import ENCODER_WIDTHS, canonical_name, embedding_dim, load_sentence_encoder

    known = ENCODER_WIDTHS.get(canonical_name(model))
    return known if known is not None else embedding_dim(load_sentence_encoder(model))


def check_sizes_file(source: str, urls: Sequence[str], counts: Mapping[str, int]) -> None:
    """The ``sizes.json`` upstream reads claims no more samples than the shards hold."""
    path = os.path.join(os.path.dirname(urls[0]), SIZES_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        claimed = json.load(fh)
    fix = "delete it and rerun `openclip-align data check --data SHARDS` (it writes one where there is none), or " \
          "delete it and pass --train-num-samples"
    for url in urls:
        name = os.path.basename(url)
        if name not in claimed:
            raise CorpusError(f"{path} has no entry for the training shard {name}; {fix}")
        if int(claimed[name]) > counts[url]:
            raise CorpusError(f"{path} says {url} holds {claimed[name]} samples, but it holds {counts[url]}; upstream "
                              f"would wait forever for the missing ones: {fix}")


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
        if lo < 0 or hi >= total:
            bad = lo if lo < 0 else hi
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
        if model is not None and expected_model is not None and _same_model(model, expected_model) is False:
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


# --- scanning many shards (data check, embed) ---------------------------------------------------------
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
