"""``openclip-align embed``: caption embeddings for a user's own OpenCLIP data, csv or webdataset shards.

Losses such as IMSep need a sentence embedding per pair. Computing them once, beside the data, keeps
training fast and reproducible. Inputs are never modified:

* csv (:func:`embed_csv`): the csv's embedding file and its record (:mod:`.csv_embeddings`), next to the
  csv (or in ``out``). A csv without an ``index`` column also gets a copy with one
  (``<stem>.indexed.csv`` beside it, or ``out/<stem>.csv``), written atomically.
* shards (:func:`embed_shards`): a column per shard (:mod:`.column`), in the column directory (default:
  beside the shards), never a copy of the shards. At CC12M size this runs on several devices at once
  (one process per device, each taking the next shard from a shared queue), resumes after an
  interruption (a shard whose column is complete and made from the same shard bytes, keys, model and
  numbering is skipped; a partial one is redone: its json, written last, is missing), and shows
  captions/s and the ETA.

The shards are scanned first (small members only, in parallel, reusing the record's entries): that
gives every shard's keys and empty captions, the total for the progress bar, and where each shard's
dataset index starts (``index_start``: shards numbered in sorted order over the rows they keep).

Every row carries its caption's fingerprint (see :mod:`.column`). ``--out DIR`` never overwrites the
column of another shard of the same name (two img2dataset exports both hold ``00000.tar``): it stops,
naming both, and the fix is another ``--out``. :func:`add_fingerprints` gives columns written before
fingerprints existed their fingerprints, reading captions only and rewriting only each column's json.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from openclip_align.atomic_files import atomic_write_json, atomic_write_text, stale_temps

from . import csv_embeddings
from . import shards as sh
from .captions import csv_row_label, empty_positions, refuse
from .column import CORPUS_META, FIX_EMBED, FIX_OTHER_SOURCE, caption_fingerprint, captions_sha256, column_paths, \
    column_problem, column_source, column_summary, encode_fingerprints, has_fingerprints, read_column_meta, \
    shard_identity, write_column, write_column_meta
from .errors import CorpusError
from .record import RecordWriter, recorded_entries, recorded_entries_by_folder, scan_shards, writable_dir, write_record
from .shard_files import caption_text, fingerprint, iter_samples, keys_sha256, shard_name
from .semantic import canonical_name, embed_captions, embedding_meta, load_sentence_encoder, resolve_devices
from .sizes import kept_samples, write_sizes_where_missing

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
        atomic_write_text(new_csv, indexed.to_csv(sep=sep, index=False))
        written["csv"] = str(new_csv)
        csv_embeddings.write(out_dir / f"{new_stem}{csv_embeddings.EMB_SUFFIX}", emb, meta)
        written["embeddings"] = str(out_dir / f"{new_stem}{csv_embeddings.EMB_SUFFIX}")
    if bad:
        written["dropped_empty_captions"] = f"{len(bad)} rows ({', '.join(csv_row_label(i) for i in bad[:5])}" + \
            (" ...)" if len(bad) > 5 else ")")
    elif beside:
        # row-aligned with the original csv too (row number = index when it has no index column)
        target = Path(csv_embeddings.embedding_path(str(csv_path)))    # where the trainer looks (a .tsv too)
        csv_embeddings.write(target, emb, meta, copy_of=written.get("embeddings"))
        written["embeddings_original"] = str(target)
        written.setdefault("embeddings", str(target))
    return written


def local_shards(data) -> List[str]:
    """The local shards ``--data`` names (a folder, a file, or a brace pattern), sorted by folder and name."""
    return [str(p) for p in sorted(_shard_files(data), key=lambda p: (str(p.parent), p.name))]


def _shard_files(data) -> List[Path]:
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


DTYPES = ("float16", "float32")


def _captions(path: str, drop: set) -> Tuple[List[str], List[str], List[str], List[str]]:
    """(row keys, their captions, every key, every caption) of a shard in tar order; ``drop``: keys left
    out. Captions are the text the trainer's decoder gives (:func:`.shard_files.caption_text`)."""
    keys, texts, every, every_text = [], [], [], []
    for key, members in iter_samples(path, frozenset({"txt"})):
        text = caption_text(members.get("txt"))
        every.append(key)
        every_text.append(text)
        if key in drop:
            continue
        keys.append(key)
        texts.append(text)
    return keys, texts, every, every_text


def _foreign_columns(paths: Sequence[str], entries: Dict[str, dict], out: str) -> None:
    """``--out`` holds no column of another shard of the same name, and no two shards share a name: a
    CorpusError naming them otherwise (a column made from this very shard, or a copy of it, is fine)."""
    by_name: Dict[str, str] = {}
    for path in paths:
        name = shard_name(path)
        if name in by_name:
            raise CorpusError(f"--data holds two shards named {name} ({by_name[name]} and {path}); in one --out "
                              f"{out} they would share one column. {FIX_OTHER_SOURCE}")
        by_name[name] = path
    for path in paths:
        json_path = column_paths(path, out)[1]
        try:
            meta = read_column_meta(json_path)
        except CorpusError:
            continue                                    # a damaged json is rewritten
        if meta is None:
            continue
        entry = entries[path]
        source = column_source(meta, json_path)
        if source == os.path.abspath(path):
            continue                                    # this shard's own column (maybe stale): redone
        differs = []
        if meta.get("shard_keys_sha256") != entry["keys_sha256"]:
            differs.append(f"keys ({meta.get('shard_count', meta.get('count'))} vs {entry['count']} samples)")
        if meta.get("shard_captions_sha256") is None:
            if meta.get("shard_bytes") != entry["bytes"]:
                differs.append(f"size ({meta.get('shard_bytes')} vs {entry['bytes']} bytes; it records no captions "
                               "hash)")
        elif meta["shard_captions_sha256"] != entry.get("captions_sha256"):
            differs.append("captions")
        if differs:
            made = source or f"a shard named {meta.get('shard')} (path not recorded)"
            raise CorpusError(
                f"--out {out} already holds {json_path}, the column of {made}, not of {path}: their "
                f"{' and '.join(differs)} differ. Refusing to overwrite it: pass another --out for these shards "
                f"(and train with --semantic-embeddings DIR_A::DIR_B), or delete that column if it is no longer used")


def _column_is_current(path: str, column_dir: str, entry: dict, model: str, dtype: str, index_start: int,
                       dropped: Sequence[str]) -> Optional[dict]:
    """The column's json when the column was made from this shard as it is, with this model, dtype and
    numbering (it may lack fingerprints: a column written before them); None when it must be embedded."""
    npy_path, json_path = column_paths(path, column_dir)
    try:
        meta = read_column_meta(json_path)
    except CorpusError:
        return None
    if meta is None or column_problem(path, column_dir, meta=meta, shard_keys_hash=entry["keys_sha256"],
                                      shard_captions_hash=entry.get("captions_sha256")) is not None:
        return None
    current = (meta.get("shard_captions_sha256") in (None, entry.get("captions_sha256"))
               and meta.get("shard_mtime_ns") == entry["mtime_ns"] and meta.get("model") == model
               and meta.get("dtype") == dtype and meta.get("index_start") == index_start
               and list(meta.get("dropped_empty_captions", ())) == list(dropped))
    return meta if current else None


def _embed_one(encoder, job: dict, batch_size: int, report) -> dict:
    """Embed one shard's captions and write its column; ``report(n)`` after every chunk of captions."""
    import numpy as np

    keys, texts, every, every_text = _captions(job["path"], set(job["dropped"]))
    if keys_sha256(every) != job["keys_sha256"]:
        raise CorpusError(f"shard {job['path']} changed while it was being embedded; rerun the same command")
    chunk = max(batch_size, 1) * 4
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(embed_captions(encoder, texts[start:start + chunk], batch_size=batch_size, progress=False))
        report(len(parts[-1]))
    emb = np.concatenate(parts) if parts else embed_captions(encoder, [], batch_size=batch_size, progress=False)
    meta = write_column(job["path"], job["column_dir"], keys, emb, model=job["model"], dtype=job["dtype"],
                        dropped=job["dropped"], index_start=job["index_start"], shard_keys=every,
                        captions=texts, shard_captions=every_text)
    return {"path": job["path"], "rows": meta["count"], "dim": meta["dim"]}


def _device_worker(device: str, model: str, batch_size: int, jobs, results, threads: Optional[int]) -> None:
    """One process per device: load the encoder there, take shards from ``jobs`` until a None."""
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        encoder = load_sentence_encoder(model, device=device)
        while True:
            job = jobs.get()
            if job is None:
                break
            results.put(("done", _embed_one(encoder, job, batch_size, lambda n: results.put(("captions", n)))))
    except BaseException as err:                     # reported to the parent, which stops the run
        results.put(("error", f"{device}: {err}"))


def embed_shards(data, out=None, model: str = "all-MiniLM-L6-v2", batch_size: int = 256, progress: bool = True,
                 device: str = "auto", drop_empty_captions: bool = False, dtype: str = "float16",
                 devices: Optional[str] = None, num_processes: Optional[int] = None,
                 scan_workers: Optional[int] = None) -> Dict[str, int]:
    """Write every shard's caption embedding column; returns {shard name: rows}. Shards are never
    modified. Samples with an empty or missing caption are refused (naming shard and key), or left
    out with ``drop_empty_captions`` (listed in the column json and counted in the record)."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    model_name = canonical_name(model)
    paths = local_shards(data)
    folders = sorted({os.path.dirname(p) for p in paths})
    if out is None:
        for folder in folders:
            if not writable_dir(folder):
                raise ValueError(f"{folder} is not writable, so the embedding columns cannot go beside its shards; "
                                 "pass --out DIR")
    column_dir = lambda path: str(out) if out is not None else os.path.dirname(path)   # noqa: E731

    # 1. scan (reusing the record's entries) for keys, empty captions and where each shard's index starts
    known = recorded_entries_by_folder(paths, column_dir)
    workers = scan_workers or min(8, os.cpu_count() or 1)
    entries, errors = scan_shards(paths, workers=workers, known=known, progress=progress)
    if errors:
        raise CorpusError(next(iter(errors.values())))
    empty = [(p, k) for p in paths for k in entries[p]["empty_caption_keys"]]
    if empty and not drop_empty_captions:
        raise refuse(f"shards {data}", [f"{os.path.basename(p)} sample {k}" for p, k in empty],
                     sum(entries[p]["count"] for p in paths))
    index_start, start = {}, 0
    for path in paths:
        index_start[path] = start
        start += kept_samples(entries[path])

    # 2. which shards still need their column (never another shard's, in a shared --out)
    if out is not None:
        _foreign_columns(paths, entries, str(out))
        Path(out).mkdir(parents=True, exist_ok=True)
    for folder in {column_dir(p) for p in paths}:
        for stale in stale_temps(folder, "*.emb.*"):
            stale.unlink()
    jobs = []
    for path in paths:
        dropped = list(entries[path]["empty_caption_keys"])
        meta = _column_is_current(path, column_dir(path), entries[path], model_name, dtype, index_start[path], dropped)
        if meta is not None and not has_fingerprints(meta):     # written before fingerprints: add them, no embedding
            _fingerprint_column(path, column_dir(path), meta)
        if meta is None:
            jobs.append({"path": path, "column_dir": column_dir(path), "model": model_name, "dtype": dtype,
                         "dropped": dropped, "index_start": index_start[path],
                         "keys_sha256": entries[path]["keys_sha256"]})
    writers = {folder: RecordWriter(folder) for folder in {column_dir(p) for p in paths}}

    def record(path: str) -> None:
        entry = dict(entries[path], column=column_summary(path, column_dir(path)))
        entries[path] = entry
        writers[column_dir(path)].add(path, entry)

    to_embed = {job["path"] for job in jobs}
    for path in paths:
        if path not in to_embed:
            record(path)

    # 3. embed: in this process, or one process per device
    total = sum(entries[j["path"]]["count"] - len(j["dropped"]) for j in jobs)
    bar = tqdm(total=total, desc="embed captions", unit="caption", unit_scale=True, smoothing=0.1,
               disable=not progress or not jobs)
    try:
        targets = resolve_devices(device, devices, num_processes) if jobs else []
        if len(targets) <= 1:
            if jobs:
                encoder = load_sentence_encoder(model, device=targets[0])
                for job in jobs:
                    _embed_one(encoder, job, batch_size, bar.update)
                    record(job["path"])
        else:
            _run_on_devices(targets, model, batch_size, jobs, bar, record)
    finally:
        bar.close()
        for writer in writers.values():
            writer.flush()

    # 4. corpus-wide summary per column directory; the sizes file beside the shards when there is none
    for folder in {column_dir(p) for p in paths}:
        mine = [p for p in paths if column_dir(p) == folder]
        cols = [entries[p]["column"] for p in mine if entries[p].get("column")]
        dims = {c["dim"] for c in cols}
        dropped = sum(len(entries[p]["empty_caption_keys"]) for p in mine)
        atomic_write_json(os.path.join(folder, CORPUS_META),
                          {"model": model_name, "dim": dims.pop() if len(dims) == 1 else None,
                           "n": int(sum(c["rows"] for c in cols)), "normalized": True, "dtype": dtype,
                           "layout": "column", **({"dropped_empty_captions": dropped} if dropped else {})})
    write_sizes_where_missing(paths, entries)
    return {os.path.basename(p): kept_samples(entries[p]) for p in paths}


def _run_on_devices(targets: Sequence[str], model: str, batch_size: int, jobs: List[dict], bar, record) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    job_queue, results = ctx.Queue(), ctx.Queue()
    for job in jobs:
        job_queue.put(job)
    for _ in targets:
        job_queue.put(None)
    cpu_share = max(1, (os.cpu_count() or 1) // len(targets))
    procs = [ctx.Process(target=_device_worker, daemon=True,
                         args=(d, model, batch_size, job_queue, results, cpu_share if d == "cpu" else None))
             for d in targets]
    for proc in procs:
        proc.start()
    done = 0
    try:
        while done < len(jobs):
            try:
                kind, value = results.get(timeout=5)
            except Exception:                              # queue.Empty: see that the workers still live
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("every embedding process ended before the shards were done") from None
                continue
            if kind == "captions":
                bar.update(value)
            elif kind == "done":
                done += 1
                record(value["path"])
            else:
                raise RuntimeError(f"embedding process on {value}")
    finally:
        for proc in procs:
            if proc.is_alive() and done < len(jobs):
                proc.terminate()
            proc.join(timeout=30)


def add_fingerprints(data, out=None) -> Dict[str, int]:
    """Give each shard's column (in ``out``, else beside the shard) the fingerprints of its rows' captions,
    for columns written before fingerprints existed; returns {shard name: rows fingerprinted} (0: it had
    them). Reads captions only (tarfile seeks over the images); rewrites only the column's json, atomically,
    and the shard's record entry where there is one. A column is vouched for only when the shard still has
    the size and keys it was made from: otherwise it is refused, naming what differs (re-embed it)."""
    paths = local_shards(data)
    done: Dict[str, int] = {}
    for path in paths:
        folder = str(out) if out is not None else os.path.dirname(path)
        json_path = column_paths(path, folder)[1]
        meta = read_column_meta(json_path)
        if meta is None:
            raise CorpusError(f"shard {path}: no column {json_path} to add fingerprints to; {FIX_EMBED}")
        if has_fingerprints(meta):
            done[shard_name(path)] = 0
            continue
        every_text = _fingerprint_column(path, folder, meta)
        _refresh_record(path, folder, every_text)
        done[shard_name(path)] = len(meta["keys"])
    return done


def _fingerprint_column(path: str, folder: str, meta: dict) -> List[str]:
    """Add the rows' caption fingerprints to the column json ``meta`` of the shard at ``path`` (see
    :func:`add_fingerprints`); returns every caption of the shard."""
    json_path = column_paths(path, folder)[1]
    keys, texts, every, every_text = _captions(path, set(meta.get("dropped_empty_captions", ())))
    size = fingerprint(path)[0]
    differs = []
    if meta.get("shard") != shard_name(path):
        differs.append(f"shard name ({meta.get('shard')})")
    if meta.get("shard_bytes") != size:
        differs.append(f"size ({meta.get('shard_bytes')} bytes when embedded, {size} now)")
    if meta.get("shard_keys_sha256") != keys_sha256(every) or list(meta.get("keys", ())) != keys:
        differs.append("keys")
    if differs:
        raise CorpusError(f"shard {path}: cannot vouch that {json_path} was made from it (its "
                          f"{' and '.join(differs)} differ); re-embed it instead: {FIX_EMBED}")
    meta.update(shard_identity(path, every, every_text, folder))
    meta["caption_fingerprints"] = encode_fingerprints(texts)
    write_column_meta(json_path, meta)
    return every_text


def _refresh_record(path: str, folder: str, every_text: Sequence[str]) -> None:
    """The shard's record entry (if any) learns its captions hash and its column's new json."""
    entry = recorded_entries([path], folder).get(path)
    if entry is None:
        return
    entry = dict(entry, captions_sha256=captions_sha256(caption_fingerprint(t) for t in every_text),
                 column=column_summary(path, folder))
    write_record(os.path.dirname(entry["_record"]), {path: entry})
