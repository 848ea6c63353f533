"""``openclip-align benchmark``: the main job (see :mod:`openclip_align.experiments.benchmark`).

The main job: upstream OpenCLIP (--loss clip) and the plugin's models and losses trained with one budget by
`python -m open_clip_train.main` on the embedded default corpus, evaluated on its held-out pairs and zero-shot sets
(mean and std over seeds).
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import add_training_command


def register(subparsers) -> None:
    parser = add_training_command(
        subparsers, "benchmark", __doc__,
        help="train plugin models and upstream CLIP with one budget on the embedded default; write results, figures",
        data_help="embedded default corpus (built with `openclip-align data build` if missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"),
                        help="folder for results.json, results.md, figures and each run's logs (default: %(default)s, "
                             "untracked; `make benchmark-publish` copies a run into the committed benchmark/)")
    parser.add_argument("--baseline", type=Path, default=Path("benchmark/baselines"),
                        help="results.json to flag regressions against, or a folder of <variant>.json files; only a "
                             "run on the same corpus is compared (default: %(default)s, the published runs)")
    parser.add_argument("--quick", action="store_true", help="1 epoch per run and 2 rounds of speed windows instead of 3")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 configs, batch 256, bf16 autocast on CUDA")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default 0 1 2)")
    parser.add_argument("--tracks", nargs="+", default=None, choices=("scratch", "pretrained"),
                        help="which tracks to run (default: both; --gpu runs the scratch track's ViT-B-16 only)")
    parser.add_argument("--parallel-runs", type=int, default=None, metavar="N",
                        help="training runs side by side, one thread each (default: 2 on a CPU with 2+ cores, "
                             "1 on a GPU); speed windows always run one at a time")
    parser.set_defaults(func=run)


def run(args) -> int:
    from openclip_align.experiments.benchmark import TRACKS, run_benchmark

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
                            tracks=args.tracks or TRACKS, baseline=args.baseline,
                            parallel_runs=args.parallel_runs)
    print((args.out / "results.md").read_text())
    if results["flags"]:
        print(f"{len(results['flags'])} regression(s) flagged against the baseline")
    print(f"Wrote {args.out}. To make it the committed copy (benchmark/, README tables): "
          f"python -m openclip_align.publishing --benchmark {args.out}")
    return 0
