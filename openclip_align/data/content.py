"""What a corpus's pairs are, as one hash: the identity that benchmark runs are compared by.

The manifest's own sha256 changes whenever its format or a recorded package version changes, even when every
pair is the same; this hash changes only when a pair does. A pair is (split, text, image bytes): the training,
held-out and cross-style pairs with their captions, and each zero-shot set's images with their class names
(split ``zeroshot/NAME``; the set's prompt templates count as one more pair without an image).

Each pair is hashed on its own and the pair digests are **sorted** before they are hashed together, so the
hash does not depend on the order of the rows. The order is a rule of the build (recorded in the manifest's
``split.order``), and the same pairs in another order change a training run the way another seed does, which
the benchmark's regression check already allows for (the seed spread); ``order_sha256`` (the digests in row
order) is recorded beside it so that a changed order is shown rather than hidden.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

CONTENT_VERSION = 1
PAIR_SPLITS = ("train", "heldout", "crossstyle")
RULE = ("sha256 over the sorted per-pair digests sha256(split NUL text NUL sha256(image bytes)); pairs: train, "
        "heldout and crossstyle csv rows (caption), zero-shot rows (class name) and each zero-shot set's templates")


def pair_digest(split: str, text: str, image: bytes) -> bytes:
    """One pair's digest: its split, its text and its image's bytes (the file's, as written)."""
    h = hashlib.sha256()
    h.update(split.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0" + hashlib.sha256(image).digest())
    return h.digest()


def content_hash(pairs: Iterable[Tuple[str, str, bytes]]) -> dict:
    """``{"sha256", "order_sha256", "pairs": {split: n}, "version", "rule"}`` of (split, text, image) pairs."""
    digests, counts = [], {}
    in_order = hashlib.sha256()
    for split, text, image in pairs:
        digest = pair_digest(split, text, image)
        digests.append(digest)
        in_order.update(digest)
        counts[split] = counts.get(split, 0) + 1
    whole = hashlib.sha256(b"".join(sorted(digests)))
    return {"sha256": whole.hexdigest(), "order_sha256": in_order.hexdigest(), "pairs": dict(sorted(counts.items())),
            "version": CONTENT_VERSION, "rule": RULE}


def corpus_pairs(data_dir: Path) -> Iterator[Tuple[str, str, bytes]]:
    """The pairs of a built corpus as its csv files list them, images read from the files they name."""
    data_dir = Path(data_dir)
    for split in PAIR_SPLITS:
        csv = data_dir / f"{split}.csv"
        if csv.exists():
            for filepath, text in _rows(csv, "title"):
                yield split, text, _image(data_dir, csv, filepath)
    for csv in sorted((data_dir / "zeroshot").glob("*.csv")):
        meta = json.loads(csv.with_suffix(".json").read_text(encoding="utf-8"))
        classnames = meta["classnames"]
        split = f"zeroshot/{csv.stem}"
        for filepath, label in _rows(csv, "label"):
            yield split, classnames[int(label)], _image(data_dir, csv, filepath)
        yield split, "\n".join(meta.get("templates", [])), b""


def content_of_files(data_dir: Path) -> dict:
    """:func:`content_hash` of a built corpus, read from its files (reads every image once: a few seconds for
    the embedded default; done at build time and for corpora whose manifest predates the hash)."""
    return content_hash(corpus_pairs(data_dir))


def _rows(csv: Path, column: str) -> Iterator[Tuple[str, str]]:
    with open(csv, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if "filepath" not in header or column not in header:
            raise ValueError(f"{csv}: header {header} lacks 'filepath' or {column!r}; it is not a corpus csv "
                             "(rebuild the corpus with `openclip-align data build`)")
        where, what = header.index("filepath"), header.index(column)
        for line in fh:
            cells = line.rstrip("\n").split("\t")
            yield cells[where], cells[what]


def _image(data_dir: Path, csv: Path, filepath: str) -> bytes:
    path = Path(filepath)
    if not path.is_absolute():
        path = data_dir / path
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{csv}: image {filepath} is missing; the corpus is incomplete or was moved "
                                f"(rebuild it with `openclip-align data build --out {data_dir}`)") from None


def pair_counts(content: Dict[str, int]) -> str:
    return ", ".join(f"{split} {n:,}" for split, n in content.items())
