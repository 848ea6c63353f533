"""Precompute caption embeddings for a user's own OpenCLIP data (csv or webdataset shards).

Losses such as IMSep need a sentence embedding per pair. Computing them once, beside the data,
keeps training fast and reproducible. Inputs are never modified:

* csv: the csv's embedding file and its record (:mod:`.csv_embeddings`), written next to the csv (or
  into ``out``). A csv without an ``index`` column also gets a copy with one (``<stem>.indexed.csv``
  beside it, or ``out/<stem>.csv``), written atomically.
* shards: a column per shard beside it (or in ``out``), never a copy of the shards (:mod:`.embed_column`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from . import csv_embeddings
from . import shards as sh
from .captions import csv_row_label, empty_positions, refuse
from .semantic import embed_captions, embedding_meta, load_sentence_encoder

INDEX_COLUMN = "index"


def _stem(path: Path) -> str:
    return path.name[:-4] if path.name.endswith(".csv") else path.stem


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
        csv_embeddings.write(out_dir / f"{new_stem}{csv_embeddings.EMB_SUFFIX}", emb, meta)
        written["embeddings"] = str(out_dir / f"{new_stem}{csv_embeddings.EMB_SUFFIX}")
    if bad:
        written["dropped_empty_captions"] = f"{len(bad)} rows ({', '.join(csv_row_label(i) for i in bad[:5])}" + \
            (" ...)" if len(bad) > 5 else ")")
    elif beside:
        # row-aligned with the original csv too (row number = index when it has no index column)
        target = csv_path.parent / f"{stem}{csv_embeddings.EMB_SUFFIX}"
        csv_embeddings.write(target, emb, meta, copy_of=written.get("embeddings"))
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
