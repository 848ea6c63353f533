"""``openclip-align study``: losses x optimizers grid (see :mod:`openclip_align.benchmark.study`)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _lr_pair(text: str):
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip().lower(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=LR such as sgd=0.05, got {text!r}") from None


def register(subparsers) -> None:
    from openclip_align.benchmark.regimes import REGIMES
    from openclip_align.benchmark.study import DEFAULT_LR, STUDY_LOSSES, STUDY_OPTIMIZERS
    from openclip_align.losses import loss_names

    parser = subparsers.add_parser(
        "study", help="train a grid of --loss x --opt with the upstream trainer on one dataset; write one table "
                      "(R@1 both ways, zero-shot top-1, their average, centroid gap) and a heat map",
        description="The course study's grid: every --losses x --optimizers cell trained by "
                    "`python -m open_clip_train.main` on one corpus, evaluated on its held-out pairs and "
                    "zero-shot sets; writes results.json, results.md and study.png into --out.")
    parser.add_argument("--data", type=Path, default=Path("data/default"),
                        help="a corpus laid out like the embedded default (train.csv, heldout.csv, zeroshot/)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"),
                        help="folder for results.json, results.md, study.png and each cell's run (default: "
                             "%(default)s, untracked; `make study-publish` copies it into the committed study/)")
    parser.add_argument("--losses", nargs="+", default=list(STUDY_LOSSES), choices=loss_names(), metavar="LOSS")
    parser.add_argument("--optimizers", nargs="+", default=list(STUDY_OPTIMIZERS), choices=sorted(DEFAULT_LR),
                        metavar="OPT", help="any of %(choices)s")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="pretrained",
                        help="pretrained: DualCLIP-Lite0-MiniLM with most of its packaged towers locked, as the course "
                             "started from pretrained encoders; scratch: DualCLIP-Tiny from random weights "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=None, help="OpenCLIP model name (default: the regime's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the regime's (pretrained 1, scratch 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=_lr_pair, nargs="+", default=[], metavar="OPT=LR",
                        help=f"per-optimizer learning rate (defaults {DEFAULT_LR})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.set_defaults(func=run)


def run(args) -> int:
    import open_clip

    from openclip_align.benchmark.regimes import REGIMES
    from openclip_align.benchmark.study import DEFAULT_LR, StudyPlan, check_corpus, run_study
    from openclip_align.benchmark.training import Budget

    regime = REGIMES[args.regime]
    args.model = args.model or regime.model
    args.epochs = args.epochs or regime.study_epochs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.model not in open_clip.list_models():
        raise SystemExit(f"unknown model {args.model!r}; `python -c \"import open_clip; "
                         "print(open_clip.list_models())\"` lists them")
    if args.epochs < 1 or args.batch_size < 2:
        raise SystemExit("--epochs must be >= 1 and --batch-size >= 2")
    try:
        check_corpus(args.data)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    unknown = sorted(set(dict(args.lr)) - set(DEFAULT_LR))
    if unknown:
        raise SystemExit(f"--lr names optimizers {unknown}; the study knows {sorted(DEFAULT_LR)}")
    plan = StudyPlan(losses=args.losses, optimizers=args.optimizers, model=args.model, seeds=args.seeds,
                     lr={**regime.lr, **dict(args.lr)}, extra=list(regime.extra), regime=regime.name,
                     budget=Budget(epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                                   precision=args.precision))
    results = run_study(args.data, args.out, plan, command="openclip-align study " + " ".join(_argv(args)))
    print((args.out / "results.md").read_text())
    return 1 if any(cell["status"] == "failed" for cell in results["cells"]) else 0


def _argv(args) -> list:
    parts = [f"--regime {args.regime}", f"--data {args.data}", f"--out {args.out}", "--losses " + " ".join(args.losses),
             "--optimizers " + " ".join(args.optimizers), f"--model {args.model}", f"--epochs {args.epochs}",
             f"--batch-size {args.batch_size}", f"--seeds {' '.join(map(str, args.seeds))}"]
    if args.lr:
        parts.append("--lr " + " ".join(f"{k}={v}" for k, v in args.lr))
    return parts
