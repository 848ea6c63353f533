"""The base of every error about what the user passed (a flag, a file, the training data).

At the bottom of the package (imports nothing of it), so that ``data/``, ``integration/`` and the
commands all derive from the same class: the trainer's excepthook and the command line show any
subclass as one line without a traceback.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """A problem with what the user passed (a flag, a file): shown as one line without a traceback."""

    user_facing = True
