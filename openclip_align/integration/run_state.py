"""The current trainer run: its parsed arguments and what its loss asks the data for.

At the bottom of ``integration/``. :mod:`.trainer_adapter` starts the run when upstream parses its
arguments and hands it to the concern modules (:mod:`.data_wiring`, :mod:`.loss_adapter`,
:mod:`.before_train`, :mod:`.loss_state`, :mod:`.eval_gap_metrics`, :mod:`.teacher`) as an argument; only
code that upstream calls without the run (the adapter's wrappers, :mod:`.csv_checks` inside dataset
builders) reads :data:`RUN`.
"""
from __future__ import annotations

import inspect
from typing import Optional

from openclip_align.losses.registry import NEEDS_INDEX, NEEDS_SEMANTIC, get_loss_spec

# the per-pair extras a batch can carry besides images and tokens
CAPTION = "caption"
INDEX = NEEDS_INDEX
SEMANTIC = NEEDS_SEMANTIC


class TrainerRun:
    """State of the current trainer run (one per process; None outside ``open_clip_train``)."""

    def __init__(self, args):
        self.args = args
        self.spec = None if args.loss == "clip" else get_loss_spec(args.loss)
        self.teacher = None
        self.teacher_sha256: Optional[str] = None
        self.teacher_encoder = None          # the teacher as the loss runs it (maybe compiled)
        self.num_train_samples: Optional[int] = None
        self.semantic_width: Optional[int] = None      # width of the precomputed embeddings, when known
        self.loss_module = None
        self.raw_tally = None
        self.stash = None                    # the extras of the latest batches (batch_extras.BatchStash)
        self.resumed_records = {}            # path -> the plugin's record the resume load took out (or None)
        self.startup_checked = False         # the checks after distributed init ran (first model creation)
        self.attached = False                # the set-up before step 1 ran (first epoch)
        self.resume_latest = getattr(args, "resume", None) == "latest"   # upstream resolves it to a path later

    @property
    def needs(self):
        return set() if self.spec is None else set(self.spec.needs)

    @property
    def needs_teacher(self) -> bool:
        return self.spec is not None and "teacher_image_features" in inspect.signature(self.spec.cls.forward).parameters

    @property
    def uses_stash(self) -> bool:
        """Whether the loss reads the batch stash (extras, or raw inputs for the teacher)."""
        return bool(self.data_extras()) or self.needs_teacher

    def data_extras(self):
        """Extras the training batches must carry for this loss."""
        extras = set(self.needs)
        if SEMANTIC in extras:
            extras.add(CAPTION)
        return extras


RUN: Optional[TrainerRun] = None


def start_run(args) -> TrainerRun:
    global RUN
    RUN = TrainerRun(args)
    return RUN


def current_args():
    """The parsed arguments of the current run, or None outside a trainer run."""
    return None if RUN is None else RUN.args
