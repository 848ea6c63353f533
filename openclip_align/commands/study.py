"""``openclip-align study``: losses x optimizers grid (see :mod:`openclip_align.experiments.grid_study`), with
``--temperatures`` the temperature study (see :mod:`openclip_align.experiments.temperature_study`), or with
``--train-fractions`` the data-scaling study (see :mod:`openclip_align.experiments.scaling_study`).

The course study's grid: every --losses x --optimizers cell trained by `python -m open_clip_train.main` on one
corpus, evaluated on its held-out pairs and zero-shot sets; writes results.json, results.md and study.png into
--out. With --temperatures: the temperature study instead (Mind the Gap's experiment): the pretrained-track CLIP
(or --start) fine-tuned one epoch at each fixed temperature, CLIP-Refine rows beside it; writes results.json,
results.md and temperature.png. With --train-fractions: the data-scaling study instead: the scratch track trained
on each fraction of the training pairs (same held-out set); writes results.json, results.md and scaling.png.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import add_training_command


def _lr_pair(text: str):
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip().lower(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=LR such as sgd=0.05, got {text!r}") from None


def _temperature(text: str) -> float:
    from openclip_align.experiments.temperature_study import check_temperatures

    try:
        return check_temperatures([float(text)])[0]
    except ValueError as err:
        message = str(err) if "must lie" in str(err) else f"expected a number such as 0.05, got {text!r}"
        raise argparse.ArgumentTypeError(message.replace("--temperatures ", "T = ", 1)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.25, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction of the training pairs must lie in (0, 1]")
    return value


# identity tells a --out not given (this very object) from an explicit `--out runs/study`
DEFAULT_OUT = Path("runs/study")
# grid flags the temperature study has no use for: it refuses them rather than ignore them
_GRID_FLAGS = ("losses", "optimizers", "regime", "model", "epochs", "batch_size", "seeds", "lr")


def register(subparsers) -> None:
    from openclip_align.experiments.grid_study import DEFAULT_LR, STUDY_LOSSES, STUDY_OPTIMIZERS
    from openclip_align.experiments.regimes import REGIMES
    from openclip_align.losses import loss_names

    parser = add_training_command(
        subparsers, "study", __doc__,
        help="train a grid of --loss x --opt with the upstream trainer on one dataset; write one table "
             "(R@1 both ways, zero-shot top-1, their average, centroid gap) and a heat map",
        data_help="a corpus laid out like the embedded default (train.csv, heldout.csv, zeroshot/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for results.json, results.md, study.png and each cell's run (default: "
                             "runs/study, or runs/study-temperature with --temperatures; untracked; "
                             "`make study-publish` / `make study-temperature-publish` copy them into the committed "
                             "study/ / study/temperature/)")
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
    temperature = parser.add_argument_group(
        "temperature study", "--temperatures switches to it; the grid flags (--losses, --optimizers, --regime, "
                             "--model, --epochs, --batch-size, --seeds, --lr) are then refused: it runs its own plan "
                             "(DualCLIP-Lite0-MiniLM with the pretrained regime's locks, seed 0)")
    temperature.add_argument("--temperatures", type=_temperature, nargs="+", default=None, metavar="T",
                             help="fine-tune the start model one epoch with --loss clip --fixed-temperature T for "
                                  "each T in [0.01, 1] (Mind the Gap's: 0.01 0.02 0.0333 0.05 0.1 1), plus "
                                  "CLIP-Refine with raw-feature HyCD, HyCD x the start's own scale and HyCD x 1")
    temperature.add_argument("--start", type=Path, default=None, metavar="CHECKPOINT",
                             help="start from this DualCLIP-Lite0-MiniLM checkpoint (e.g. a benchmark run's "
                                  "pretrained CLIP epoch_2.pt) instead of training the benchmark's pretrained-track "
                                  "CLIP row first")
    scaling = parser.add_argument_group(
        "data-scaling study", "--train-fractions switches to it: the benchmark's scratch track (upstream CLIP, "
                              "SharedCLIP, AlignCLIP, its budget) on nested subsets of the training pairs, scored on "
                              "the same held-out pairs; --seeds defaults to 0 1 2 here, the other grid flags are "
                              "refused")
    scaling.add_argument("--train-fractions", type=_fraction, nargs="+", default=None, metavar="F",
                         help="fractions of train.csv in (0, 1], e.g. 0.25 0.5 1: nested subsets (each smaller one "
                              "inside each larger one) drawn once from a fixed seed, never the training seed")
    temperature.add_argument("--refine-lrs", type=float, nargs="+", default=None, metavar="LR",
                             help="CLIP-Refine's three rows at each of these learning rates, the rest of the authors' "
                                  "recipe unchanged (default: theirs, 1e-6; `make study-temperature`: 1e-6 1e-4, "
                                  "where refine moves the model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.train_fractions is not None:
        return run_scaling(args)
    if args.temperatures is not None:
        return run_temperatures(args)
    if args.start is not None or args.refine_lrs is not None:
        raise SystemExit("--start and --refine-lrs belong to the temperature study: pass --temperatures too")
    import open_clip

    from openclip_align.experiments.grid_study import DEFAULT_LR, StudyPlan, check_corpus, run_study
    from openclip_align.experiments.regimes import REGIMES
    from openclip_align.experiments.trainer_processes import Budget

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


def run_temperatures(args) -> int:
    from dataclasses import replace

    from openclip_align.experiments.temperature_study import (REFINE_RECIPE, TemperaturePlan, check_refine_lrs,
                                                      check_temperatures, run_temperature_study)

    defaults = vars(_defaults())
    given = [f"--{name.replace('_', '-')}" for name in _GRID_FLAGS if getattr(args, name) != defaults[name]]
    if given:
        raise SystemExit(f"--temperatures runs the temperature study with its own plan; {', '.join(given)} "
                         "belong to the losses x optimizers grid: drop them (or drop --temperatures)")
    try:
        temperatures = check_temperatures(args.temperatures)
        refine_lrs = check_refine_lrs(args.refine_lrs or [REFINE_RECIPE["lr"]])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.start is not None and not args.start.is_file():
        raise SystemExit(f"--start {args.start}: no such checkpoint file")
    if args.start is not None:                 # a file that is no CLIP checkpoint: refused before any training
        from openclip_align.experiments.temperature_study import learned_logit_scale

        try:
            learned_logit_scale(args.start)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    from openclip_align.experiments.grid_study import check_corpus

    try:
        check_corpus(args.data)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    if args.out is DEFAULT_OUT:
        args.out = Path("runs/study-temperature")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = TemperaturePlan(temperatures=temperatures, start=args.start, refine_lrs=refine_lrs)
    plan.start_budget = replace(plan.start_budget, device=args.device, precision=args.precision)
    command = (f"openclip-align study --data {args.data} --out {args.out} --temperatures "
               + " ".join(f"{t:g}" for t in temperatures) + (f" --start {args.start}" if args.start else "")
               + (" --refine-lrs " + " ".join(f"{lr:g}" for lr in refine_lrs) if args.refine_lrs else ""))
    results = run_temperature_study(args.data, args.out, plan, command=command)
    print((args.out / "results.md").read_text())
    return 1 if any(row["status"] == "failed" for row in results["rows"]) else 0


def run_scaling(args) -> int:
    from openclip_align.experiments.scaling_study import DEFAULT_SEEDS, ScalingPlan, check_fractions, run_scaling_study
    from openclip_align.experiments.grid_study import check_corpus

    if args.temperatures is not None or args.start is not None or args.refine_lrs is not None:
        raise SystemExit("--train-fractions runs the data-scaling study; --temperatures/--start/--refine-lrs belong "
                         "to the temperature study: run them separately")
    defaults = vars(_defaults())
    given = [f"--{name.replace('_', '-')}" for name in _GRID_FLAGS if name != "seeds"
             and getattr(args, name) != defaults[name]]
    if given:
        raise SystemExit(f"--train-fractions trains the benchmark's scratch track with its own budget; "
                         f"{', '.join(given)} belong to the losses x optimizers grid: drop them")
    try:
        fractions = check_fractions(args.train_fractions)
        check_corpus(args.data)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    seeds = list(DEFAULT_SEEDS) if args.seeds == defaults["seeds"] else args.seeds
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    if args.out is DEFAULT_OUT:
        args.out = Path("runs/study-scaling")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = ScalingPlan(fractions=fractions, seeds=seeds, device=args.device, precision=args.precision)
    command = (f"openclip-align study --data {args.data} --out {args.out} --train-fractions "
               + " ".join(f"{f:g}" for f in fractions) + " --seeds " + " ".join(map(str, seeds)))
    try:
        results = run_scaling_study(args.data, args.out, plan, command=command)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print((args.out / "results.md").read_text())
    return 1 if any(cell["status"] == "failed" for cell in results["cells"]) else 0


def _defaults():
    """The study parser's defaults (what a flag not given is)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["study"])


def _argv(args) -> list:
    parts = [f"--regime {args.regime}", f"--data {args.data}", f"--out {args.out}", "--losses " + " ".join(args.losses),
             "--optimizers " + " ".join(args.optimizers), f"--model {args.model}", f"--epochs {args.epochs}",
             f"--batch-size {args.batch_size}", f"--seeds {' '.join(map(str, args.seeds))}"]
    if args.lr:
        parts.append("--lr " + " ".join(f"{k}={v}" for k, v in args.lr))
    return parts
