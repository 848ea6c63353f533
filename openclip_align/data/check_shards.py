"""``openclip-align data check``: scan shards made by other tools (img2dataset ...) once, in parallel
processes, and record what they hold (:mod:`.record`), so the trainer verifies them from the record in
time proportional to the number of shards. Resumable: shards already recorded with the same bytes and
mtime are not read again; entries are written as the scan goes."""
from __future__ import annotations

import os
from typing import List, Optional

from .errors import CorpusError
from .preflight import check_index_ranges
from .record import RecordWriter, record_dir_for, recorded_entries_by_folder, scan_shards
from .shard_files import listed
from .sizes import write_sizes_where_missing


def check_shards(data, workers: int = 1, out: Optional[str] = None, progress: bool = True) -> dict:
    """Record every shard; returns {"entries": {path: entry}, "errors": {path: msg}, "problems": [str],
    "record_dirs": [dir]}. Problems: unreadable shards, empty captions, mixed index numbering, bad
    caption embedding members, index ranges that overlap or leave [0, N)."""
    from .embed import local_shards

    paths = local_shards(data)
    targets = {}
    for path in paths:
        folder = os.path.dirname(path)
        targets[path] = str(out) if out is not None else record_dir_for(folder)
    known = recorded_entries_by_folder(paths, targets.__getitem__)
    writers = {d: RecordWriter(d) for d in set(targets.values())}
    try:
        entries, errors = scan_shards(paths, workers=workers, known=known, progress=progress,
                                      on_entry=lambda path, entry: writers[targets[path]].add(path, entry))
    finally:
        for writer in writers.values():
            writer.flush()
    write_sizes_where_missing(paths, entries)        # upstream's epoch size, where there is none
    problems: List[str] = list(errors.values())
    for path in paths:
        entry = entries.get(path)
        if entry is None:
            continue
        problems.extend(entry.get("problems", ()))
        if entry["empty_caption_keys"]:
            problems.append(f"shard {path}: {len(entry['empty_caption_keys'])} samples have an empty or missing "
                            f"caption ({listed(entry['empty_caption_keys'])}); write them, or train with "
                            "--drop-empty-captions")
        if 0 < entry["index_count"] < entry["count"]:
            problems.append(f"shard {path}: only {entry['index_count']} of {entry['count']} samples have a KEY.json "
                            "\"index\"; losses with a per-pair index need all or none")
        if not entry["indices_unique"]:
            problems.append(f"shard {path}: some samples share a KEY.json \"index\"")
    indexed = [p for p in paths if p in entries and entries[p]["index_count"] == entries[p]["count"] > 0]
    if indexed and len(indexed) == len(entries):
        try:
            check_index_ranges("the shards", [(entries[p]["index_min"], entries[p]["index_max"], f"shard {p}")
                                              for p in indexed], sum(entries[p]["count"] for p in paths))
        except CorpusError as err:
            problems.append(str(err))
    return {"entries": entries, "errors": errors, "problems": problems, "record_dirs": sorted(writers)}
