"""Precompute caption embeddings for a user's own OpenCLIP data (csv or webdataset shards).

Losses such as IMSep need a sentence embedding per pair. Computing them once, beside the data,
keeps training fast and reproducible. Inputs are never modified:

* csv: ``<stem>.emb.npy`` (float32 [N, d], row i = csv row i, L2-normalised) and ``<stem>.emb.json``
  are written next to the csv (or into ``out``). A csv without an ``index`` column also gets a
  copy with one (``<stem>.indexed.csv`` beside it, or ``out/<stem>.csv``), written atomically.
* shards: a column per shard, ``NAME.emb.npy`` + ``NAME.emb.json`` beside it (or in ``out``), never a
  copy of the shards (:mod:`.embed_column`).

A csv's ``.emb.json`` also records, under ``"file"``, what the writer knew of the ``.emb.npy``: its size,
a hash of its first and last MiB, and whether every value is finite. A trainer whose file matches the
record trusts it instead of reading every row of a file that may hold tens of GB (:func:`recorded_finite`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import shards as sh
from .captions import csv_row_label, empty_positions, is_empty, refuse
from .semantic import canonical_name, embed_captions, embedding_meta, load_sentence_encoder

INDEX_COLUMN = "index"
EMB_SUFFIX = ".emb.npy"
EMB_META_SUFFIX = ".emb.json"
SHARD_EMB_META = "embeddings.json"
FILE_RECORD = "file"
_END_BYTES = 1 << 20


def fingerprint(path) -> Dict[str, object]:
    """Size and a hash of the first and last MiB of a file: cheap at any size, changed by any rewrite of
    the embeddings (a copy with new file times keeps it)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_END_BYTES))
        if size > _END_BYTES:
            fh.seek(max(_END_BYTES, size - _END_BYTES))
            digest.update(fh.read(_END_BYTES))
    return {"bytes": size, "ends_sha256": digest.hexdigest()}


def file_record(npy_path, emb: np.ndarray) -> Dict[str, object]:
    """The ``"file"`` entry of the ``.emb.json`` for ``emb`` just written to ``npy_path``."""
    return {**fingerprint(npy_path), "finite": bool(np.isfinite(emb).all())}


def recorded_finite(npy_path, meta_path) -> Optional[bool]:
    """What the writer recorded about the finiteness of ``npy_path``, if the record matches the file as it is
    (same size, same first and last MiB); None when there is no record or it is of another file."""
    try:
        record = json.loads(Path(meta_path).read_text()).get(FILE_RECORD)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(record, dict) or "finite" not in record:
        return None
    if {k: record.get(k) for k in ("bytes", "ends_sha256")} != fingerprint(npy_path):
        return None
    return bool(record["finite"])


def _stem(path: Path) -> str:
    return path.name[:-4] if path.name.endswith(".csv") else path.stem


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = sh.temp_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def embed_csv(csv_path, model: str = "all-MiniLM-L6-v2", out=None, sep: str = "\t", caption_key: str = "title",
              batch_size: int = 256, progress: bool = True, device: str = "cpu",
              drop_empty_captions: bool = False) -> Dict[str, str]:
    """Embed the ``caption_key`` column of a csv; returns {what: path} of the files written.

    Rows with an empty caption are refused (:mod:`.captions`); with ``drop_empty_captions`` they are left
    out of a copy of the csv (``<stem>.indexed.csv``), which the embeddings then follow row by row."""
    import pandas as pd

    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path, sep=sep, dtype=str, keep_default_na=False)
    if caption_key not in df.columns:
        raise ValueError(f"{csv_path}: no caption column {caption_key!r} (columns: {', '.join(df.columns)}); "
                         "pass --csv-caption-key")
    bad = empty_positions(df[caption_key])
    if bad and not drop_empty_captions:
        raise refuse(f"{csv_path} (column {caption_key!r})", [csv_row_label(i) for i in bad], len(df))
    df = df.drop(index=df.index[bad]).reset_index(drop=True)
    out_dir = Path(out) if out else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    beside = out_dir.resolve() == csv_path.parent.resolve()
    stem = _stem(csv_path)

    encoder = load_sentence_encoder(model, device=device)
    emb = embed_captions(encoder, df[caption_key].tolist(), batch_size=batch_size, progress=progress)
    meta = embedding_meta(model, emb)
    written: Dict[str, str] = {}

    has_index = INDEX_COLUMN in df.columns
    if has_index:
        values = pd.to_numeric(df[INDEX_COLUMN], errors="coerce")
        if values.isna().any() or not values.is_unique:
            raise ValueError(f"{csv_path}: column {INDEX_COLUMN!r} must hold a unique integer per row")
    if not beside or not has_index or bad:
        # a copy of the csv (with an index column when it had none); the original is left as it is
        new_stem = stem if not beside else f"{stem}.indexed"
        indexed = df if has_index else df.assign(**{INDEX_COLUMN: [str(i) for i in range(len(df))]})
        new_csv = out_dir / f"{new_stem}.csv"
        sh.atomic_write_text(new_csv, indexed.to_csv(sep=sep, index=False))
        written["csv"] = str(new_csv)
        sh.atomic_write_npy(out_dir / f"{new_stem}{EMB_SUFFIX}", emb)
        sh.atomic_write_json(out_dir / f"{new_stem}{EMB_META_SUFFIX}",
                             {**meta, FILE_RECORD: file_record(out_dir / f"{new_stem}{EMB_SUFFIX}", emb)})
        written["embeddings"] = str(out_dir / f"{new_stem}{EMB_SUFFIX}")
    if bad:
        written["dropped_empty_captions"] = f"{len(bad)} rows ({', '.join(csv_row_label(i) for i in bad[:5])}" + \
            (" ...)" if len(bad) > 5 else ")")
    elif beside:
        # row-aligned with the original csv too (row number = index when it has no index column)
        target = csv_path.parent / f"{stem}{EMB_SUFFIX}"
        if "embeddings" in written:
            _link_or_copy(Path(written["embeddings"]), target)
        else:
            sh.atomic_write_npy(target, emb)
        sh.atomic_write_json(csv_path.parent / f"{stem}{EMB_META_SUFFIX}", {**meta, FILE_RECORD: file_record(target, emb)})
        written["embeddings_original"] = str(target)
        written.setdefault("embeddings", str(target))
    return written


def _shard_list(data) -> List[Path]:
    data = str(data)
    if os.path.isdir(data):
        found = sh.list_shards(data)
        if not found:
            raise FileNotFoundError(f"{data}: no .tar shards in this directory")
        return found
    try:
        import braceexpand

        names = list(braceexpand.braceexpand(data))
    except ImportError:
        names = [data]
    paths = [Path(n) for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards not found: {', '.join(map(str, missing[:3]))}")
    return paths


def embed_shards(data, out=None, **kwargs) -> Dict[str, int]:
    """Caption embeddings of shards as a column beside them (see :mod:`.embed_column`); {shard: rows}."""
    from .embed_column import embed_shards as embed_column

    return embed_column(data, out, **kwargs)
