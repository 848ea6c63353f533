"""The plugin's flags for ``python -m open_clip_train.main``.

Upstream builds its argparse parser inside its own parsing function and we cannot add to it, so the
plugin's flags are read first by a parser of our own (``parse_known_args``, no abbreviations), the rest
goes to upstream's parsing unchanged (:mod:`.trainer_adapter` hands it over), and the two namespaces are
merged. That also keeps
``--loss`` from being read by upstream as an abbreviation of ``--loss-dist-impl``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Sequence

from openclip_align.data.column import COLUMN_META_SUFFIX, COLUMN_SUFFIX, EMB_MEMBER
from openclip_align.data.csv_embeddings import EMB_SUFFIX
from openclip_align.losses.options import flag_dests
from openclip_align.losses.registry import get_loss_spec, loss_names

from . import fixed_temperature

SEMANTIC_SOURCES = ("auto", "precomputed", "on-the-fly")
OPT_ALIASES = {
    # --opt NAME -> the timm optimizer OpenCLIP 3.3 already supports as --opt timm/NAME
    "sgd": "timm/momentum",   # plain SGD with momentum (timm's "sgd" is Nesterov)
    "adam": "timm/adam",      # Adam with coupled (L2) weight decay, unlike AdamW
}


def build_plugin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="open_clip_train.main (openclip-align flags)", add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("openclip-align")
    group.add_argument("--loss", default="clip", choices=loss_names(), metavar="NAME",
                       help=f"training objective; one of: {', '.join(loss_names())} (default: clip, "
                            "upstream OpenCLIP's loss, unchanged)")
    group.add_argument("--semantic-source", default="auto", choices=SEMANTIC_SOURCES,
                       help="where a loss that needs caption embeddings gets them: precomputed (csv side "
                            f"file / KEY.{EMB_MEMBER} shard member), on-the-fly (embed each batch's captions), "
                            "or auto (precomputed when present, else on the fly)")
    group.add_argument("--semantic-model", default="all-mpnet-base-v2",
                       help="sentence-transformers model for on-the-fly caption embeddings (default: the AlignCLIP "
                            "authors' all-mpnet-base-v2; all-MiniLM-L6-v2 is the fast choice)")
    group.add_argument("--semantic-embeddings", default=None,
                       help="precomputed caption embeddings: for a csv, the row-aligned .npy file (default: <csv "
                            f"stem>{EMB_SUFFIX}); for webdataset shards, the folder of their embedding columns "
                            f"(NAME{COLUMN_SUFFIX} + NAME{COLUMN_META_SUFFIX}, as `openclip-align embed --out DIR` writes them; "
                            "default: beside the shards), or A::B, one folder per '::' source of --train-data, "
                            "in the same order")
    group.add_argument("--csv-index-key", default="index",
                       help="csv column with a stable per-pair index (default: the row number if absent)")
    group.add_argument("--drop-empty-captions", action="store_true",
                       help="leave out training pairs whose caption is empty or missing (counted in the log) "
                            "instead of refusing the data; csv rows and shard samples alike")
    group.add_argument("--gap-metrics", default=True, action=argparse.BooleanOptionalAction,
                       help="log modality-gap metrics next to retrieval metrics during evaluation")
    group.add_argument("--gap-max-pairs", type=int, default=5000,
                       help="subsample size for the O(N^2) modality-gap metrics")
    group.add_argument("--log-root", default=None, metavar="DIR",
                       help="the same as upstream's --logs DIR, in a spelling torchrun does not read as an "
                            "abbreviation of its own --logs-specs (see docs/training.md)")
    fixed_temperature.add_args(group)
    for name in loss_names():
        if name != "clip":
            spec = get_loss_spec(name)
            spec.cls.add_args(parser.add_argument_group(f"--loss {name}", spec.help))   # what the loss is
    return parser


def loss_option_names(loss_name: str) -> List[str]:
    """The argparse dests a loss adds (recorded in checkpoints with their values)."""
    if loss_name == "clip":
        return []
    return flag_dests(get_loss_spec(loss_name).cls)


def _refuse_abbreviations(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    ours = [opt for action in parser._actions for opt in action.option_strings]
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        if flag in ours:
            continue
        extended = [opt for opt in ours if opt.startswith(flag)]
        if extended:
            parser.error(f"{flag} is an abbreviation of {', '.join(extended)}; write the flag in full "
                         "(upstream argparse would otherwise read it as a different option)")


def parse_with_plugin(argv, upstream_parse):
    """``argv`` (None: ``sys.argv[1:]``): the plugin's flags read here, the rest by ``upstream_parse``,
    merged into upstream's namespace and checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_plugin_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
    _refuse_abbreviations(parser, argv)
    plugin_args, rest = parser.parse_known_args(argv)
    args = upstream_parse(rest)
    for key, value in vars(plugin_args).items():
        setattr(args, key, value)
    _apply_log_root(parser, args, rest)
    _finish(parser, args)
    return args


def _apply_log_root(parser: argparse.ArgumentParser, args, upstream_argv: Sequence[str]) -> None:
    """``--log-root DIR`` sets upstream's ``args.logs`` (``--logs`` itself trips torchrun's parser)."""
    if args.log_root is None:
        return
    if any(token == "--logs" or token.startswith("--logs=") for token in upstream_argv):
        parser.error("--log-root and --logs name the same directory; pass only one of them")
    args.logs = args.log_root


def _finish(parser: argparse.ArgumentParser, args) -> None:
    opt = str(getattr(args, "opt", "adamw")).lower()
    if opt in OPT_ALIASES:
        args.opt = OPT_ALIASES[opt]
        if opt == "sgd":
            args.beta1 = args.beta2 = None          # SGD takes no betas (timm path asserts both or none)
            if args.momentum is None:
                args.momentum = 0.9
        logging.info("--opt %s runs as --opt %s", opt, args.opt)
    fixed_temperature.check_args(parser, args)
    if args.loss == "clip":
        return
    for problem in _plugin_loss_conflicts(args):
        parser.error(problem)
    model = str(args.model)
    if args.loss == "refine" and not args.pretrained and not model.startswith(("hf-hub:", "local-dir:")):
        # the frozen teacher is the starting model: without weights it would be a random network
        parser.error("--loss refine post-trains an already trained model: pass --pretrained PATH_OR_TAG "
                     "(a checkpoint file or a pretrained tag of --model)")


def _plugin_loss_conflicts(args) -> List[str]:
    """Flags that select an upstream loss of their own, or a launcher the plugin's losses do not gather over:
    each refused with why and what to use instead (refused here, before the model is built)."""
    name = f"--loss {args.loss}"
    problems = []
    if args.siglip:
        problems.append(f"{name} cannot be combined with --siglip: --siglip selects upstream's sigmoid loss "
                        f"(SigLipLoss) in place of {name}'s objective; train SigLIP with --loss clip --siglip, "
                        f"or drop --siglip to train {name}")
    if getattr(args, "distill_model", None):
        problems.append(f"{name} cannot be combined with --distill-model: that selects upstream's DistillClipLoss "
                        f"in place of {name}'s objective; distil with --loss clip --distill-model ..., or use "
                        "--loss refine, which distils from the starting model (--pretrained) itself")
    if "coca" in str(args.model).lower():
        problems.append(f"{name} cannot train a CoCa model ({args.model}): CoCa trains with upstream's CoCaLoss "
                        "(captioning + contrastive); use --loss clip, or a CLIP model with " + name)
    if getattr(args, "horovod", False):
        problems.append(f"{name} gathers features with torch.distributed, which horovod does not set up: launch "
                        "with torchrun (or SLURM's srun) instead of --horovod")
    return problems
