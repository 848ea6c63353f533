"""Webdataset shards of the digit scans for the training-data tests: writing them (with or without their
caption embeddings, sizes.json, a record), the trainer's args for them, and what upstream's own pipeline
decodes from them with the plugin's extras."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip_train.data as oc_data
import pandas as pd
import webdataset as wds

from openclip_align.data.record import scan_shard, write_record
from openclip_align.integration import training_shards

WIDTH = 384


def unit_vectors(n, width=WIDTH, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_shards(folder: Path, csv: Path, parts, emb=None, sizes=True, meta_width=WIDTH, edit=None):
    """Shards of the digit scans in ``csv`` (``parts``: row ranges, one per shard) with txt/json/emb.npy
    members; ``edit(i, sample)`` may change a sample. Returns the brace pattern for --train-data."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.read_csv(csv, sep="\t")
    emb = unit_vectors(len(rows)) if emb is None else emb
    counts = {}
    for shard, part in enumerate(parts):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in part:
                sample = {"__key__": f"{i:09d}", "png": Path(rows.filepath[i]).read_bytes(), "txt": rows.title[i],
                          "json": {"index": i}, "emb.npy": emb[i]}
                if edit is not None:
                    edit(i, sample)
                sink.write(sample)
        counts[name] = len(part)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps(counts))
    if meta_width:
        (folder / "embeddings.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": meta_width}))
    last = len(parts) - 1
    return str(folder / f"shard-{{000000..{last:06d}}}.tar") if last else str(folder / "shard-000000.tar")


def shard_args(train_data, **kw):
    """The args the data wiring reads, for imsep on ``train_data`` (``kw`` overrides any)."""
    base = dict(train_data=train_data, semantic_source="precomputed", semantic_model="all-MiniLM-L6-v2",
                loss="imsep", batch_size=8, workers=0, world_size=1, train_num_samples=None,
                dataset_resampled=False, drop_empty_captions=False, semantic_embeddings=None, distributed=False)
    base.update(kw)
    return SimpleNamespace(**base)


def record_shards(folder: Path, want_index=True):
    """What `openclip-align data check` writes: one record entry per shard (record.scan_shard)."""
    write_record(str(folder), {p.name: scan_shard(str(p), want_index=want_index)
                               for p in sorted(folder.glob("*.tar"))})


def plan_shards(args, semantic=True, index=False):
    needs = ({"semantic", "caption"} if semantic else set()) | ({"index"} if index else set())
    return training_shards.plan_training_shards(args, needs, oc_data.expand_urls, oc_data.get_dataset_size)


def decoded_extras(pattern, args, semantic=True, index=False):
    """The extras of every training sample as upstream's own webdataset pipeline decodes them (workers 0)."""
    needs = ({"semantic", "caption"} if semantic else set()) | ({"index"} if index else set())
    plan = plan_shards(args, semantic, index)
    extras = training_shards.ShardSampleExtras(plan, needs, args.semantic_source)
    keep = training_shards.CaptionFilter(oc_data.filter_no_caption_or_no_image, plan.urls,
                                         plan.check.dropped if plan.check else frozenset(), args.drop_empty_captions)
    stream = wds.DataPipeline(wds.SimpleShardList(pattern), oc_data.tarfile_to_samples_nothrow, wds.select(keep),
                              wds.decode("pilrgb"),
                              wds.map(lambda s: {"key": s["__key__"], **extras(s)}))
    return list(stream)
