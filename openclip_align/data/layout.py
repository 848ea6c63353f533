"""The files of a built corpus: each split's images, csv, caption embeddings and shards, the zero-shot
sets, and the :class:`Writer` that writes them and remembers what it wrote (a rebuild prunes the rest).

Beside each split's shards go their sizes (:mod:`.sizes`), each shard's caption-embedding column
(:mod:`.column`) and the record of what each shard holds (:mod:`.record`); the split's csv has its caption
embeddings beside it (:mod:`.csv_embeddings`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from openclip_align.atomic_files import atomic_write_bytes, json_bytes

from . import csv_embeddings
from . import shards as sh
from .pairs import DrawnPair
from .sizes import SIZES_FILE
from .sources import digits as digits_source
from .sources import emoji_group as emoji_group_source
from .sources import fashion_mnist as fashion_source

CSV_HEADER = ("filepath", "title", "index", "source")
ZEROSHOT_HEADER = ("filepath", "label")
ZEROSHOT = {"fashion_mnist": fashion_source, "digits": digits_source}
# zero-shot sets made of held-out pictures rather than drawn from a package of their own
HELDOUT_ZEROSHOT = {"emoji_group": emoji_group_source}


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
        atomic_write_bytes(path, data, fsync=False)
        return path

    def file(self, rel: str, data: bytes) -> Path:
        path = self.out / rel
        self.written.add(path)
        return atomic_write_bytes(path, data)

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


def _sample_meta(rec: DrawnPair) -> dict:
    return {"index": rec.index, "source": rec.item.source, "base": rec.base, "caption": rec.item.caption}


def _compact_json(obj) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _shard_samples(records: Sequence[DrawnPair]):
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


def image_rel(split: str, index: int) -> str:
    return f"images/{split}/{index:09d}.png"


def write_split(writer: Writer, name: str, records: Sequence[DrawnPair], emb: Optional[np.ndarray], encoder: Optional[str],
                shard_size: Optional[int], progress: bool) -> dict:
    """images/<name>/*.png, <name>.csv, its caption embeddings and (if shard_size) <name>/ shards."""
    from tqdm.auto import tqdm

    from .semantic import embedding_meta

    rows = []
    for rec in tqdm(records, desc=f"write {name} images", unit="img", disable=not progress, leave=False):
        path = writer.image(image_rel(name, rec.index), rec.png)
        rows.append((str(path.resolve()), rec.item.caption, rec.index, rec.item.source))
    files = {"csv": f"{name}.csv", "images": f"images/{name}"}
    if emb is not None:
        npy = csv_embeddings.embedding_path(f"{name}.csv")
        writer.file(npy, sh.npy_bytes(emb))
        writer.file(csv_embeddings.meta_path(npy), json_bytes(embedding_meta(encoder, emb)))
        files.update(embeddings=npy, embeddings_meta=csv_embeddings.meta_path(npy))
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
    writer.file(f"zeroshot/{name}.json", json_bytes({"classnames": list(module.CLASSNAMES),
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
    writer.file("zeroshot/emoji_group.json", json_bytes({"classnames": list(module.CLASSNAMES),
                                                             "templates": list(module.TEMPLATES)}))
    writer.file("zeroshot/emoji_group.csv", sh.tsv_text(ZEROSHOT_HEADER, rows).encode("utf-8"))
    counts = np.bincount(np.asarray([label for _, label in rows], dtype=np.int64), minlength=len(module.CLASSNAMES))
    return {"csv": "zeroshot/emoji_group.csv", "json": "zeroshot/emoji_group.json", "n": len(rows),
            "classes": len(module.CLASSNAMES), "per_class": [int(c) for c in counts], "licence": module.LICENCE,
            "images": "heldout", "labelled": how}
