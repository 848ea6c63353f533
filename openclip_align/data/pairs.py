"""The build's pairs before they are written: drawn from their sources, de-duplicated, grouped into
bases and split.

Identical pictures keep only the first; clip-art drawings that only look alike are found by a 64-bit
dHash (candidates) and confirmed on 16x16 thumbnails (:func:`drop_near_duplicates`). Items sharing a group
key (skin-tone variants, equal captions ...) form one base, and a base is held out as a whole by a salted
hash (:func:`heldout_of`), so no variant of a held-out picture trains.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import shards as sh
from .sources import Item, render_item

SPLIT_SALT = "openclip-align-split-v1"
NEAR_DUPLICATE_BITS = 16         # dHash Hamming distance that makes two openclipart drawings candidates ...
NEAR_DUPLICATE_MAD = 3.0         # ... and mean absolute difference of 16x16 RGB thumbnails (0..255) that makes them one
THUMB = 16


@dataclass
class DrawnPair:
    """One drawn pair on its way to the output."""
    item: Item
    png: bytes
    dhash: int = 0
    thumb: bytes = b""
    base: str = ""
    index: int = -1
    split: str = ""


@dataclass
class SourceStats:
    listed: int = 0
    not_drawable: int = 0
    render_errors: int = 0
    duplicates: int = 0
    near_duplicates: int = 0
    capped: int = 0
    train: int = 0
    heldout: int = 0
    extra: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def heldout_of(base: str, fraction: float) -> bool:
    """The split rule: a base is held out iff its salted hash falls below ``fraction``."""
    return int(_sha(f"{SPLIT_SALT}:{base}")[:8], 16) / 2 ** 32 < fraction


def order_key(item: Item) -> str:
    """Sample order: a hash of the id, so sources mix inside every shard, yet stable across builds."""
    return _sha(f"{item.source}/{item.uid}")


# --- drawing --------------------------------------------------------------------------------
def _draw_one(job: Tuple[Item, int]):
    item, size = job
    from .render import RenderError, dhash

    try:
        image = render_item(item, size)
    except RenderError:
        return "error"
    except Exception:           # noqa: BLE001 - a broken source file must not stop the build
        return "error"
    if image is None:
        return None
    from PIL import Image

    thumb = image.convert("RGB").resize((THUMB, THUMB), Image.BOX).tobytes()
    return sh.png_bytes(image), dhash(image), thumb


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def draw(items: Sequence[Item], size: int, workers: int, progress: bool, desc: str) -> List[object]:
    """Draw items (in worker processes when several cores), results in item order."""
    from tqdm.auto import tqdm

    jobs = [(item, size) for item in items]
    bar = dict(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    if workers <= 1 or len(jobs) < 64:
        return [_draw_one(j) for j in tqdm(jobs, **bar)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return list(tqdm(pool.imap(_draw_one, jobs, chunksize=16), **bar))


# --- grouping and split ---------------------------------------------------------------------
def assign_bases(records: Sequence[DrawnPair]) -> None:
    """Union items that share any group key; each component is one base, named by its simplest member."""
    parent: Dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for rec in records:
        keys = [f"{rec.item.source}|{k}" for k in rec.item.group_keys] or [f"{rec.item.source}|uid:{rec.item.uid}"]
        for k in keys[1:]:
            a, b = find(keys[0]), find(k)
            if a != b:
                parent[max(a, b)] = min(a, b)
    components: Dict[str, List[DrawnPair]] = {}
    for rec in records:
        first = rec.item.group_keys[0] if rec.item.group_keys else f"uid:{rec.item.uid}"
        components.setdefault(find(f"{rec.item.source}|{first}"), []).append(rec)
    for members in components.values():
        rep = min(members, key=lambda r: (len(r.item.uid), r.item.uid))
        base = f"{rep.item.source}:{rep.item.base_hint or rep.item.uid}"
        for rec in members:
            rec.base = base


def drop_duplicates(records: List[DrawnPair], stats: Dict[str, SourceStats]) -> List[DrawnPair]:
    """Identical pictures (e.g. two flags drawn alike, the font's unknown-flag glyph) keep only the first."""
    seen, kept = set(), []
    for rec in records:
        digest = hashlib.sha1(rec.png).digest()
        if digest in seen:
            stats[rec.item.source].duplicates += 1
            continue
        seen.add(digest)
        kept.append(rec)
    return kept


def drop_near_duplicates(records: List[DrawnPair], max_bits: int = NEAR_DUPLICATE_BITS,
                         max_mad: float = NEAR_DUPLICATE_MAD) -> Tuple[List[DrawnPair], int]:
    """Greedy in item order: drop a drawing that looks like one already kept.

    The 64-bit dHash alone is too coarse for clip-art on white (a sword and a rake collide), so it
    only picks candidates; a candidate is a duplicate when the 16x16 RGB thumbnails differ by at
    most ``max_mad`` grey levels on average (the same drawing filed twice, a re-coloured button).
    """
    kept: List[DrawnPair] = []
    hashes = np.zeros(len(records), dtype=np.uint64)
    thumbs = np.zeros((len(records), THUMB * THUMB * 3), dtype=np.int16)
    n = 0
    dropped = 0
    for rec in records:
        h = np.uint64(rec.dhash)
        thumb = np.frombuffer(rec.thumb, dtype=np.uint8).astype(np.int16)
        if n:
            candidates = np.flatnonzero(_popcount(hashes[:n] ^ h) <= max_bits)
            if len(candidates) and float(np.abs(thumbs[candidates] - thumb).mean(axis=1).min()) <= max_mad:
                dropped += 1
                continue
        hashes[n] = h
        thumbs[n] = thumb
        n += 1
        kept.append(rec)
    return kept, dropped


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(len(values), 8)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1)


def evenly(records: List[DrawnPair], k: int) -> List[DrawnPair]:
    if len(records) <= k:
        return records
    step = len(records) / k
    return [records[int(i * step)] for i in range(k)]
