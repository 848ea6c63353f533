"""The corpus's evaluation sets in the layouts CLIP_benchmark reads offline.

CLIP_benchmark (``clip_benchmark eval``, PyPI ``clip-benchmark``) downloads its datasets unless they are
already where it looks. Two of its loaders take local files:

* ``--dataset mscoco_captions``: torchvision's ``CocoCaptions`` over ``ROOT/val2014`` (must exist) with
  the COCO-captions annotations ``ROOT/coco_test_karpathy.json`` (``--split test``, the default). The
  held-out pairs go there (``clip_benchmark/mscoco_captions/``), one image per pair with its caption;
  ``file_name`` is relative to ``val2014/`` and points at the corpus's own images, so nothing is copied
  and the corpus folder can move as a whole. The cross-style pairs (full corpus) get a second root,
  ``clip_benchmark/mscoco_crossstyle/``.
* ``--dataset wds/NAME``: WebDataset shards ``ROOT/test/0.tar`` (+ ``nshards.txt``) of ``KEY.png`` +
  ``KEY.cls`` with ``classnames.txt`` and ``zeroshot_classification_templates.txt`` (``{c}`` placeholder).
  Each zero-shot class set ``zeroshot/NAME`` goes to ``clip_benchmark/NAME/`` (images copied into the
  shard).

With ``--dataset_root 'DIR/clip_benchmark/{dataset}'`` one command reaches all of them (CLIP_benchmark
fills ``{dataset}`` with the name after ``wds/``). The manifest's command is the retrieval one; the zero-shot
sets run with ``--task zeroshot_classification`` and the same template (CLIP_benchmark 1.6.2 needs NumPy < 2.4
for that task, which the dev extra pins: docs/notes.md). Everything is written from the corpus's csv/json files,
so a fresh build and :func:`add_clip_benchmark` on an existing corpus write the same bytes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

from openclip_align.atomic_files import atomic_write_bytes, atomic_write_json, json_bytes

from . import shards as sh

FOLDER = "clip_benchmark"
RETRIEVAL_SETS = {"heldout": "mscoco_captions", "crossstyle": "mscoco_crossstyle"}
ANNOTATION_FILE = "coco_test_karpathy.json"       # what CLIP_benchmark's mscoco_captions reads for --split test
IMAGE_FOLDER = "val2014"                          # must exist under the root, or it downloads COCO
IMAGE_FOLDER_NOTE = (b"Images of this COCO-captions style set stay in the corpus's images/ folder: the file_name "
                     b"fields of ../" + ANNOTATION_FILE.encode() + b" are relative to this folder.\n")


class _Files:
    """Minimal writer: atomic files under ``out``, remembering what was written (for pruning)."""

    def __init__(self, out: Path, written: Optional[set] = None):
        self.out = out
        self.written = written if written is not None else set()

    def file(self, rel: str, data: bytes) -> Path:
        path = self.out / rel
        self.written.add(path)
        return atomic_write_bytes(path, data)


def _coco_captions(csv_path: Path, image_folder: Path) -> dict:
    """COCO-captions annotations of an OpenCLIP pair csv: image id = row, one caption per image."""
    from ..evaluation.readers import CsvPairs

    pairs = CsvPairs(csv_path)
    images = [{"id": row, "file_name": os.path.relpath(path, image_folder)}
              for row, path in enumerate(pairs.filepaths)]
    annotations = [{"id": row, "image_id": row, "caption": str(caption)} for row, caption in enumerate(pairs.captions)]
    return {"info": {"description": f"{csv_path.name} in COCO-captions layout, for CLIP_benchmark"},
            "images": images, "annotations": annotations}


def _wds_classification(files: _Files, rel: str, csv_path: Path, classnames, templates) -> dict:
    """One-shard WebDataset classification set as CLIP_benchmark's ``wds/`` loader expects it."""
    from ..evaluation.readers import CsvImages

    images = CsvImages(csv_path)
    samples = []
    for row, (path, label) in enumerate(zip(images.filepaths, images.labels)):
        ext = Path(path).suffix.lower().lstrip(".")
        if ext not in ("png", "jpg", "jpeg", "webp"):
            raise ValueError(f"{csv_path}: row {row}: {path} is not a png/jpg/webp image, which is all "
                             "CLIP_benchmark's wds loader decodes")
        samples.append((f"{row:09d}", [(ext, Path(path).read_bytes()), ("cls", str(label).encode())]))
    tar = files.out / rel / "test" / "0.tar"
    sh.write_tar(tar, samples)
    files.written.add(tar)
    files.file(f"{rel}/test/nshards.txt", b"1\n")
    files.file(f"{rel}/dataset_type.txt", b"classification\n")
    files.file(f"{rel}/classnames.txt", "".join(f"{c}\n" for c in classnames).encode("utf-8"))
    files.file(f"{rel}/zeroshot_classification_templates.txt",
               "".join(f"{t.replace('{}', '{c}')}\n" for t in templates).encode("utf-8"))
    return {"root": rel, "dataset": f"wds/{Path(rel).name}", "n": len(samples), "classes": len(classnames)}


def write_clip_benchmark_sets(out, written: Optional[set] = None) -> dict:
    """Write ``out/clip_benchmark/`` from the corpus's pair csvs and zero-shot sets; returns the manifest
    entry (roots, dataset names, counts and the command to run)."""
    from ..evaluation.zero_shot import load_classnames

    out = Path(out).absolute()
    files = _Files(out, written)
    entry: Dict[str, dict] = {"retrieval": {}, "zeroshot": {}}
    for split, name in RETRIEVAL_SETS.items():
        csv_path = out / f"{split}.csv"
        if not csv_path.is_file():
            continue
        image_folder = out / FOLDER / name / IMAGE_FOLDER
        annotations = _coco_captions(csv_path, image_folder)
        files.file(f"{FOLDER}/{name}/{IMAGE_FOLDER}/README.txt", IMAGE_FOLDER_NOTE)
        files.file(f"{FOLDER}/{name}/{ANNOTATION_FILE}", json_bytes(annotations))
        entry["retrieval"][split] = {"root": f"{FOLDER}/{name}", "dataset": "mscoco_captions",
                                     "n": len(annotations["images"])}
    for spec in sorted((out / "zeroshot").glob("*.json")):
        csv_path = spec.with_suffix(".csv")
        if not csv_path.is_file():
            continue
        classnames, templates = load_classnames(spec)
        entry["zeroshot"][spec.stem] = _wds_classification(files, f"{FOLDER}/{spec.stem}", csv_path, classnames,
                                                           templates)
    entry["command"] = command_for("DIR", entry)       # no machine path: rebuilds elsewhere give equal manifests
    return entry


def command_for(out, entry: dict, model: str = "MODEL", checkpoint: str = "CHECKPOINT") -> str:
    """The ``clip_benchmark eval`` command for the held-out retrieval set of ``entry``. The zero-shot sets
    (``wds/NAME``) take the same ``--dataset_root`` template with ``--task zeroshot_classification``; they are
    listed in the entry (README shows that command)."""
    datasets = [s["dataset"] for s in entry["retrieval"].values() if s["root"].endswith("/mscoco_captions")]
    return (f"clip_benchmark eval --model {model} --pretrained {checkpoint} --dataset {' '.join(datasets)} "
            f"--dataset_root '{Path(out) / FOLDER}/{{dataset}}' --recall_k 1 5 --no_amp --num_workers 0 "
            "--output 'clip_benchmark_{dataset}_{model}.json'")


def add_clip_benchmark(out) -> dict:
    """Write ``clip_benchmark/`` into a finished corpus without rebuilding it; returns the updated manifest."""
    out = Path(out).absolute()
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} is missing: {out} is not a finished corpus (build it with "
                                "`openclip-align data build --out DIR`)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    # the pairs, images and class sets are only read: the manifest keeps vouching for them throughout and
    # is replaced atomically at the end (readers such as a running benchmark never see it missing)
    written: set = set()
    manifest["clip_benchmark"] = write_clip_benchmark_sets(out, written)
    for stale in sorted((out / FOLDER).rglob("*"), reverse=True):    # sets the corpus no longer has
        if stale.is_file() and stale not in written:
            stale.unlink()
        elif stale.is_dir() and not any(stale.iterdir()):
            stale.rmdir()
    atomic_write_json(manifest_path, manifest)
    return manifest
