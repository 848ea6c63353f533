"""One hierarchy for training data that cannot be trained on as it is.

Every class derives from :class:`TrainingDataError`, itself a
:class:`openclip_align.errors.UserInputError`: the trainer and the commands show any of them as one line
without a traceback, and a catch of the base covers every data problem. Messages name the file or shard,
the row or sample key, and the fix.
"""
from __future__ import annotations

from openclip_align.errors import UserInputError


class TrainingDataError(UserInputError):
    """The training data cannot be trained on as it is (said before step 1, in one line)."""


class MissingExtrasError(TrainingDataError):
    """The training data lacks something the chosen loss needs (said before the first step)."""


class EmptyCaptionError(TrainingDataError):
    """Some pairs have no caption text."""


class CorpusError(TrainingDataError):
    """Shards, their record or their embedding columns cannot be trained on as they are; the message names
    the shard, the sample and the fix."""
