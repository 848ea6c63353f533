"""A csv's caption embeddings: ``<csv stem>.emb.npy`` and ``<csv stem>.emb.json`` beside the csv.

* ``.emb.npy``: float32 [N, d], row i = csv row i, L2-normalised (``openclip-align embed --data X.csv``);
* ``.emb.json``: the encoder (``model``, ``dim``, ``n``, ``normalized``) and, under ``"file"``, what the
  writer knew of the ``.emb.npy``: its size, a hash of its first and last MiB, and whether every value is
  finite. A trainer whose file matches the record trusts it (:func:`recorded_finite`) instead of reading
  every row of a file that may hold tens of GB; any other file is read once (:func:`non_finite_row`).

The one owner of these names and checks: ``embed`` writes through :func:`write`, the trainer's csv dataset
opens the file with :func:`open_rows` and checks it with :func:`check_width` and :func:`finiteness_problem`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from openclip_align.atomic_files import atomic_write_json, temp_name

from . import column
from . import shards as sh
from .errors import CorpusError, MissingExtrasError

EMB_SUFFIX = ".emb.npy"             # <csv without .csv> + EMB_SUFFIX
EMB_META_SUFFIX = ".emb.json"
FILE_RECORD = "file"
FIX = "recompute it with `openclip-align embed`"
_END_BYTES = 1 << 20


def embedding_path(csv_path: str) -> str:
    """Where the trainer looks for the embeddings of ``csv_path`` (without ``--semantic-embeddings``)."""
    base = csv_path[:-4] if csv_path.endswith(".csv") else csv_path
    return base + EMB_SUFFIX


def meta_path(embeddings_path: str) -> str:
    """The ``.emb.json`` beside an ``.emb.npy``."""
    base = embeddings_path[:-len(".npy")] if embeddings_path.endswith(".npy") else embeddings_path
    return base + ".json"


# --- the file record: written with the embeddings, trusted while the file matches it ----------------
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


def write(npy_path, emb: np.ndarray, meta: dict, copy_of=None) -> None:
    """``emb`` at ``npy_path`` (a hard link or copy of ``copy_of`` when it holds the same array), then its
    ``.emb.json``: ``meta`` with the file record. Both atomically; the json last."""
    npy_path = Path(npy_path)
    if copy_of is None:
        sh.atomic_write_npy(npy_path, emb)
    else:
        tmp = temp_name(npy_path)
        try:
            os.link(copy_of, tmp)
        except OSError:
            shutil.copyfile(copy_of, tmp)
        os.replace(tmp, npy_path)
    atomic_write_json(meta_path(str(npy_path)), {**meta, FILE_RECORD: file_record(npy_path, emb)})


# --- read by the trainer's csv dataset -------------------------------------------------------------
def open_rows(path: str, n_rows: int) -> np.ndarray:
    """The embeddings memory-mapped: one floating point row per csv row, or a MissingExtrasError."""
    embeddings = np.load(path, mmap_mode="r")
    if embeddings.ndim != 2 or len(embeddings) != n_rows:
        raise MissingExtrasError(f"{path}: expected one embedding row per csv row ({n_rows}), "
                                 f"got shape {embeddings.shape}; {FIX}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise MissingExtrasError(f"{path}: embeddings must be floating point, got dtype {embeddings.dtype}; {FIX}")
    return embeddings


def check_width(path: str, width: int, csv_path: str) -> None:
    """``width`` is usable and agrees with the ``.emb.json`` beside the embeddings and the encoder it names
    (the rule of :func:`.column.check_embedding_width`), or a MissingExtrasError."""
    try:
        column.check_embedding_width(path, width, meta_path(path),
                                     f"Recompute it with `openclip-align embed --data {csv_path}`")
    except CorpusError as err:
        raise MissingExtrasError(str(err)) from None


def finiteness_problem(path: str, embeddings: np.ndarray, recorded: Optional[bool], read: bool,
                       chunk_values: int = 1 << 24) -> Optional[str]:
    """What is wrong with the values of ``path``: non-finite by its record (``recorded`` False), or found
    non-finite by reading it (only when ``read``); None otherwise."""
    if recorded is False:
        return f"{path}: `openclip-align embed` found non-finite values (NaN or inf) when it wrote it; {FIX}"
    return non_finite_row(path, embeddings, chunk_values) if read else None


def non_finite_row(path: str, embeddings: np.ndarray, chunk_values: int) -> Optional[str]:
    """Read ``embeddings`` once in chunks (it may be memory-mapped and large): the first non-finite row."""
    logging.info("openclip-align: %s has no finiteness record of `openclip-align embed` (or the file changed "
                 "since): reading it once to check for NaN/inf", path)
    rows = max(1, chunk_values // max(1, embeddings.shape[1]))
    for start in range(0, len(embeddings), rows):
        finite = np.isfinite(np.asarray(embeddings[start:start + rows])).all(axis=1)
        if not finite.all():
            return f"{path}: row {start + int(np.argmin(finite))} holds non-finite values (NaN or inf); {FIX}"
    return None
