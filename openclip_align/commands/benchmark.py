"""``openclip-align benchmark``: the main job (see :mod:`openclip_align.benchmark.run`)."""
from __future__ import annotations

import logging
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="train plugin models and upstream CLIP with one budget on the embedded default; "
                          "write results.json, results.md and figures",
        description="The main job: upstream OpenCLIP (--loss clip) and the plugin's models and losses trained "
                    "with one budget by `python -m open_clip_train.main` on the embedded default corpus, "
                    "evaluated on its held-out pairs and zero-shot sets (mean and std over seeds).")
    parser.add_argument("--data", type=Path, default=Path("data/default"),
                        help="embedded default corpus (built with `openclip-align data build` if missing)")
    parser.add_argument("--out", type=Path, default=Path("benchmark"),
                        help="folder for results.json, results.md, figures and each run's logs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1 epoch per run (about 5 minutes on 2 CPU cores)")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 configs, batch 256, bf16 autocast on CUDA")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default 0 1 2)")
    parser.add_argument("--tracks", nargs="+", default=None, choices=("scratch", "pretrained"),
                        help="which tracks to run (default: both; --gpu runs the scratch track's ViT-B-16 only)")
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README",
                        help="after the run, rewrite the benchmark tables between the markers in this README")
    parser.set_defaults(func=run)


def run(args) -> int:
    from openclip_align.benchmark.run import TRACKS, run_benchmark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu asked for but no CUDA device is visible")
    if not (args.data / "train.csv").exists():
        from openclip_align.data.build import build_corpus

        logging.info("benchmark: %s has no corpus yet; building the full embedded default", args.data)
        build_corpus(args.data, size="full")
    results = run_benchmark(args.data, args.out, quick=args.quick, gpu=args.gpu, seeds=args.seeds,
                            tracks=args.tracks or TRACKS)
    print((args.out / "results.md").read_text())
    if args.update_readme:
        from openclip_align.benchmark.readme import update_readme

        update_readme(args.update_readme, args.out / "results.json")
    if results["flags"]:
        print(f"{len(results['flags'])} regression(s) flagged against the previous run")
    return 0
