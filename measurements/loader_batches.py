"""Loader seconds per batch, ``--loss clip`` against ``--loss imsep``, at batch 512 and 2048 (issue 29).

Writes synthetic img2dataset-like shards (``KEY.jpg`` 32x32 noise, ``KEY.txt``, ``KEY.json`` with
``"index"``, ``KEY.emb.npy`` a 384-wide unit vector), then builds the training loader exactly as the
trainer does with the plugin active (upstream's ``get_wds_dataset``, AlignCLIP-Tiny's train transform and
tokenizer, the extras requested for imsep) and times the batches it delivers to the main process:

* ``clip``: images and tokens only;
* ``imsep``: plus the caption embedding and the raw caption, collated in the worker (one tensor per name);
* ``imsep, per-sample extras (before)``: the extras left one tensor per sample and stacked in the main
  process, as before issue 29 (run here under this machine's descriptor limit, which it fits).

"tensors per batch" is how many tensors cross from a worker: each costs a shared-memory file descriptor
while it is in flight. The first batch (workers starting, shuffle buffer filling) is timed separately.
Writes measurements/loader_batches.json and .md, with the load average seen (2 shared cores here;
``--report-only`` rewrites the .md from the .json):

    nice -n 5 python measurements/loader_batches.py
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from openclip_align.data.column import CORPUS_META, EMB_MEMBER
from openclip_align.data.sizes import SIZES_FILE

HERE = Path(__file__).resolve().parent
WIDTH = 384
VARIANTS = ("clip", "imsep", "imsep, per-sample extras (before)")


def write_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> str:
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {}
    for shard in range(n_shards):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for j in range(per_shard):
                i = shard * per_shard + j
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                vector = rng.normal(size=WIDTH).astype(np.float32)
                sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": f"a photo of thing {i}",
                            "json": {"index": i}, EMB_MEMBER: vector / np.linalg.norm(vector)})
        sizes[name] = per_shard
    (folder / SIZES_FILE).write_text(json.dumps(sizes))
    (folder / CORPUS_META).write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": WIDTH}))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


@contextlib.contextmanager
def _per_sample_extras():
    """The batching of before issue 29: upstream's collation, extras left a list of per-sample dicts."""
    from openclip_align.integration import batch_extras
    from openclip_align.integration.loader_health import FullPassGuard

    patched = batch_extras.WebdatasetWithExtras.batched

    def batched(self, batchsize, collation_fn=None, partial=True):
        stage = self._wds.batched(batchsize, partial=partial)
        return stage if partial else FullPassGuard(stage, batchsize)

    batch_extras.WebdatasetWithExtras.batched = batched
    try:
        yield
    finally:
        batch_extras.WebdatasetWithExtras.batched = patched


def measure(pattern: str, variant: str, batch_size: int, workers: int, batches: int) -> dict:
    import open_clip
    import open_clip_train.data as oc_data

    from openclip_align.integration import batch_extras, loader_health, trainer_adapter, training_shards

    args = SimpleNamespace(train_data=pattern, batch_size=batch_size, workers=workers, world_size=1, seed=0,
                           train_num_samples=10 ** 7, dataset_resampled=False, train_data_upsampling_factors=None,
                           semantic_source="precomputed", semantic_model="all-MiniLM-L6-v2", loss=variant[:5],
                           drop_empty_captions=False, semantic_embeddings=None, distributed=False)
    preprocess = open_clip.image_transform(32, is_train=True)
    tokenizer = open_clip.get_tokenizer("AlignCLIP-Tiny")
    needs = set() if variant == "clip" else {"semantic", "caption"}
    with contextlib.ExitStack() as stack:
        if needs:
            plan = training_shards.plan_training_shards(args, needs, oc_data.expand_urls, oc_data.get_dataset_size)
            extras = training_shards.ShardSampleExtras(plan, needs, "precomputed")
            stack.enter_context(batch_extras.requesting(needs, shard_extras=extras))
        if "before" in variant:
            stack.enter_context(_per_sample_extras())
        stack.enter_context(trainer_adapter.stopping_on_fatal_read_errors(oc_data))
        loader = oc_data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
    start = time.perf_counter()
    stamps, tensors = [], None
    iterator = iter(loader)
    for _ in range(batches + 1):
        batch = next(iterator)
        if tensors is None:
            tensors = loader_health._tensors(batch)
        if len(batch) == 3:
            batch_extras.collate_extras(batch[2])          # the main process's share (stacking, before the fix)
        stamps.append(time.perf_counter())
    del iterator                                           # stops the workers
    steady = np.diff(stamps)
    return {"variant": variant, "batch_size": batch_size, "workers": workers, "batches_timed": batches,
            "first_batch_s": round(stamps[0] - start, 3), "s_per_batch": round(float(steady.mean()), 4),
            "s_per_batch_min": round(float(steady.min()), 4), "s_per_batch_max": round(float(steady.max()), 4),
            "tensors_per_batch": tensors, "load_average_after": round(os.getloadavg()[0], 2)}


def report(results: dict) -> str:
    rows = results["runs"]
    lines = ["# Loader seconds per batch: clip against imsep (issue 29)", "",
             f"`python measurements/loader_batches.py` on {results['cpu_count']} CPU cores, "
             f"--workers {results['workers']}, AlignCLIP-Tiny's train transform (32 px) and tokenizer, "
             f"{results['samples']:,} synthetic samples in {results['shards']} shards (32x32 JPEG, caption, "
             f"KEY.json index, {WIDTH}-wide KEY.emb.npy). Seconds per batch delivered to the main process, "
             f"mean over {results['batches_512']} batches at 512 and {results['batches_2048']} at 2048 after "
             "the first (min-max in brackets); \"tensors\" cross from a worker per batch, one shared-memory file "
             "descriptor each while in flight.", "",
             "| batch | variant | s / batch | ms / sample | tensors per batch | first batch (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['variant']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['batch_size']} | {r['variant']} | {r['s_per_batch']:.3f} "
                     f"({r['s_per_batch_min']:.3f}-{r['s_per_batch_max']:.3f}) | "
                     f"{1000 * r['s_per_batch'] / r['batch_size']:.2f} | {r['tensors_per_batch']} | "
                     f"{r['first_batch_s']:.1f} |")
    load = results["load_average"]
    lines += ["", f"Load average (1 min): {load['before']} before, at most {load['max_seen']} after a run "
              f"({results['cpu_count']} cores{', shared with other work: the machine was busy' if load['max_seen'] > 1.5 else ''}). "
              f"Descriptor limit during the runs: soft {results['nofile'][0]}, hard {results['nofile'][1]}.", "",
              "The tensor counts are exact and do not depend on the machine: with the extras collated in the worker "
              "a batch costs the same few descriptors at 512 and at 2048, where one tensor per sample cost 514 and "
              "2050 (two workers with two batches in flight each then need several thousand descriptors, beyond a "
              "`ulimit -n` of 1024). The seconds vary several-fold from batch to batch on a busy machine: a "
              "difference between variants smaller than the min-max spread is noise.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches-512", type=int, default=16)
    parser.add_argument("--batches-2048", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "loader_batches")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the last .json")
    args = parser.parse_args(argv)
    if args.report_only:
        args.out.with_suffix(".md").write_text(report(json.loads(args.out.with_suffix(".json").read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = round(os.getloadavg()[0], 2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.shards, args.per_shard)
        for batch_size, batches in ((512, args.batches_512), (2048, args.batches_2048)):
            for variant in VARIANTS:
                try:
                    runs.append(measure(pattern, variant, batch_size, args.workers, batches))
                except Exception as exc:      # a variant that cannot run here is a result too
                    from openclip_align.integration.trainer_errors import one_line

                    runs.append({"variant": variant, "batch_size": batch_size, "error": one_line(exc)})
                print(json.dumps(runs[-1]), file=sys.stderr)
    seen = [r["load_average_after"] for r in runs if "load_average_after" in r]
    results = {"cpu_count": os.cpu_count(), "workers": args.workers, "shards": args.shards,
               "samples": args.shards * args.per_shard, "batches_512": args.batches_512,
               "batches_2048": args.batches_2048, "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
               "load_average": {"before": load_before, "max_seen": max(seen + [load_before])},
               "date": time.strftime("%Y-%m-%d"), "runs": runs}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
