"""The training data of a run whose loss needs more than images and tokens.

Upstream's data builder makes every split; for ``--train-data`` shards the run's shards are planned
first (:mod:`.training_shards`: what their record says, checked once per run), and when the loss reads
per-pair extras (caption embeddings, dataset indices, the raw inputs for a teacher) the train split is
built here, its loader wrapped so each batch's extras reach the stash (:mod:`.batch_extras`). Upstream's
builders come in as plain callables (:class:`UpstreamData`, made by :mod:`.trainer_adapter`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

from openclip_align.data.dataset_index import FIX_CSV_NUMBERING, check_index_range, dataset_size
from openclip_align.data.errors import MissingExtrasError
from openclip_align.losses.registry import NEEDS_INDEX, NEEDS_SEMANTIC

from . import batch_extras, csv_checks, training_shards
from .batch_extras import ExtrasLoader
from .run_state import TrainerRun


@dataclass(frozen=True)
class UpstreamData:
    """Upstream's data side as plain callables."""
    build_all: Callable                 # (args, preprocess_fns, epoch=, tokenizer=) -> {split: DataInfo}
    train_builder: Callable             # (args) -> the builder of args.train_data: (args, preprocess, is_train=,
                                        #   epoch=, tokenizer=) -> DataInfo
    builds_shards: Callable             # (builder) -> whether it reads webdataset shards
    expand: Callable                    # (spec) -> (urls, weights), ``::`` sources and brace patterns expanded
    source_size: Callable               # (one source) -> (samples, shards) from its sizes file / __len__
    reading: Callable[..., ContextManager]   # (plan, drop_empty) -> while built: caption filter, read errors


def build_data(run: Optional[TrainerRun], args, preprocess_fns, epoch, tokenizer, upstream: UpstreamData) -> dict:
    """What upstream's data builder returns, with the train split planned, checked and carrying extras."""
    if run is None or not args.train_data or args.dataset_type == "synthetic":
        if run is not None and run.uses_stash and args.dataset_type == "synthetic":
            raise MissingExtrasError(f"--loss {args.loss} needs captions/indices; synthetic data has none")
        return upstream.build_all(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    dataset_fn = upstream.train_builder(args)
    plan = None
    if upstream.builds_shards(dataset_fn):              # no shard is opened here: see training_shards
        plan = training_shards.plan_training_shards(args, run.data_extras(), upstream.expand, upstream.source_size)
        for note in plan.notes:
            logging.info("openclip-align: %s", note)
    drop_empty = bool(getattr(args, "drop_empty_captions", False))
    if not run.uses_stash:
        with upstream.reading(plan, drop_empty):
            data = upstream.build_all(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if "train" in data:
            csv_checks.check_has_a_batch(args, data["train"])
        return data
    source = args.semantic_source
    options = dict(csv_index_key=args.csv_index_key, csv_embeddings=None if plan else args.semantic_embeddings,
                   semantic_precomputed=source != "on-the-fly", semantic_on_the_fly=source != "precomputed")
    if plan is not None:
        options["shard_extras"] = training_shards.ShardSampleExtras(plan, run.data_extras(), source)
        run.semantic_width = plan.width
    with batch_extras.requesting(run.data_extras(), **options), upstream.reading(plan, drop_empty):
        train = dataset_fn(args, preprocess_fns[0], is_train=True, epoch=epoch, tokenizer=tokenizer)
    csv_checks.check_has_a_batch(args, train)
    if NEEDS_SEMANTIC in run.needs and plan is None:
        csv_checks.log_csv_on_the_fly(args, train)
    train.dataloader = ExtrasLoader(train.dataloader, run.stash)
    run.num_train_samples = (plan.total if plan is not None else
                             dataset_size(args.train_data, upstream.source_size, getattr(train.dataloader, "dataset", None)))
    indices = getattr(getattr(train.dataloader, "dataset", None), "indices", None)
    if NEEDS_INDEX in run.needs and indices is not None and run.num_train_samples:
        check_index_range(f"--loss {args.loss}: {args.train_data}", indices, run.num_train_samples, fix=FIX_CSV_NUMBERING)
    saved = args.train_data
    args.train_data = None          # upstream builds val / imagenet exactly as before
    try:
        data = upstream.build_all(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    finally:
        args.train_data = saved
    return {"train": train, **data}
