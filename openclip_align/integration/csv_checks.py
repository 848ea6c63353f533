"""Checks of a csv training set that belong to the trainer (upstream reads the csv whole into memory).

Shards are checked by :mod:`training_shards` (their record once per run, the rest as samples are
decoded); the csv's embedding file by :mod:`openclip_align.data.csv_embeddings`. Here:

* csv captions: none empty or missing (:mod:`openclip_align.data.captions`; ``--drop-empty-captions``
  drops and counts them instead);
* a batch per process: a csv smaller than one batch would give zero training steps;
* ``--semantic-source auto``: one line saying whether the csv's batches are embedded on the fly.
"""
from __future__ import annotations

import logging
from typing import List, Sequence

from openclip_align.data.captions import DROP_FLAG, refuse
from openclip_align.data.csv_embeddings import EMB_SUFFIX
from openclip_align.data.errors import TrainingDataError

from . import run_state


def drop_empty_captions_requested() -> bool:
    args = run_state.current_args()
    return bool(args is not None and getattr(args, "drop_empty_captions", False))


def check_csv_captions(path: str, captions: Sequence) -> List[int]:
    """Positions of rows without a caption; raises unless ``--drop-empty-captions`` (then logs the count)."""
    from openclip_align.data.captions import csv_row_label, empty_positions

    bad = empty_positions(captions)
    if bad and not drop_empty_captions_requested():
        raise refuse(path, [csv_row_label(i) for i in bad], len(captions))
    if bad:
        logging.warning("openclip-align: %s: dropped %d of %d pairs with an empty or missing caption (%s)",
                        path, len(bad), len(captions), DROP_FLAG)
    return bad


def check_has_a_batch(args, train) -> None:
    """A csv dataset smaller than one batch gives zero training steps; say so instead."""
    loader = train.dataloader
    if getattr(loader, "num_batches", None) != 0:
        return
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else getattr(loader, "num_samples", 0)
    world = max(1, int(getattr(args, "world_size", 1) or 1))
    raise TrainingDataError(
        f"--train-data {args.train_data}: {size} training pairs make no full batch of --batch-size "
        f"{args.batch_size} x {world} process(es) (training drops the last partial batch); lower --batch-size "
        "or add pairs")


def log_csv_on_the_fly(args, train) -> None:
    """``--semantic-source auto`` on a csv: one line saying whether its batches are embedded on the fly."""
    if getattr(args, "semantic_source", None) != "auto":
        return
    dataset = getattr(train.dataloader, "dataset", None)
    if getattr(dataset, "embeddings", 1) is None:
        logging.info("openclip-align: --semantic-source auto: all %s batches per epoch are embedded on the fly "
                     "by --semantic-model %s: the csv has no precomputed embeddings (%s)",
                     getattr(train.dataloader, "num_batches", None), args.semantic_model,
                     getattr(dataset, "embeddings_path", f"no {EMB_SUFFIX} beside it"))
    else:
        logging.info("openclip-align: --semantic-source auto: 0 batches are embedded on the fly: every row has "
                     "its precomputed embedding")
