"""The caption-embedding column of a shard: its file names, writing, reading and identity check.

A column per shard: ``COLDIR/NAME.emb.npy`` ([n, d], row r = the r-th captioned sample of ``NAME.tar`` in
tar order) and ``COLDIR/NAME.emb.json`` (its keys, model, width, ``index_start``: the dataset index of
row 0, and the shard it was made from: path, size, sample count, a hash of its keys and of its
captions). The json is written after the array, so a json that exists vouches for a complete column.
Caption embeddings never need a copy of the images.

A column row belongs to a caption, not to a file name: two img2dataset exports both hold ``00000.tar``
with keys ``000000000``..., and one shard may be embedded from a local copy and trained from ``pipe:``.
So every row carries its caption's fingerprint (:func:`caption_fingerprint`, 8 bytes), compared with
the caption of the sample it is joined to as that sample is decoded (:class:`ColumnReader`): a column
made from other captions stops the run at the first affected sample, local, ``pipe:`` or remote alike.
Columns written before fingerprints existed still train (a warning says how to add them:
:data:`FIX_FINGERPRINTS`). Also here: the older per-sample member ``KEY.emb.npy`` (:func:`check_vector`)
and the width checks every caption embedding passes.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import logging
import os
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from openclip_align.atomic_files import atomic_write_bytes

from .captions import DROP_FLAG
from .errors import CorpusError
from .shard_files import REMOTE, caption_text, compact_json_bytes, fingerprint, keys_sha256, read_json, \
    shard_name

COLUMN_SUFFIX = ".emb.npy"
COLUMN_META_SUFFIX = ".emb.json"
COLUMN_FORMAT = "openclip-align-embedding-column/1"
EMB_MEMBER = "emb.npy"                  # today's per-sample member holding a caption embedding
CORPUS_META = "embeddings.json"         # corpus-wide {"model", "dim", ...} beside shards or columns

FIX_EMBED = "rerun `openclip-align embed --data SHARDS` (it writes the column NAME.emb.npy/.emb.json)"
FIX_FINGERPRINTS = "openclip-align embed --data SHARDS [--out COLDIR] --add-fingerprints"
FIX_OTHER_SOURCE = ("give each source its own columns: `openclip-align embed --data SOURCE --out DIR` per source, "
                    "then --semantic-embeddings DIR_A::DIR_B in the order of --train-data's :: sources")
CAPTION_FP_BYTES = 8


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
    atomic_write_bytes(json_path, compact_json_bytes(meta))
    return meta


def encode_fingerprints(captions: Iterable[str]) -> str:
    """The rows' caption fingerprints as the json stores them: one base64 string of 8 bytes per row
    (about 11 bytes of json per sample)."""
    return base64.b64encode(b"".join(caption_fingerprint(c) for c in captions)).decode("ascii")


def write_column_meta(json_path: str, meta: dict) -> None:
    """Replace a column's json atomically (the array is left as it is)."""
    atomic_write_bytes(json_path, compact_json_bytes(meta))


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

def read_column_meta(json_path: str) -> Optional[dict]:
    """A column's json, or None when it does not exist (the column is then missing or incomplete)."""
    meta = read_json(json_path, FIX_EMBED)
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
        if self.expected_model is not None and same_model(meta.get("model"), self.expected_model) is False:
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


def same_model(a: Optional[str], b: Optional[str]) -> Optional[bool]:
    from .semantic import canonical_name

    if not a or not b:
        return None
    return canonical_name(a) == canonical_name(b) or os.path.basename(str(a)) == os.path.basename(str(b))


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
