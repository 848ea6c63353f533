"""One rule for empty or missing captions, applied by the trainer, ``openclip-align embed`` and ``data build``.

A pair whose caption is missing (no value, NaN from pandas, no ``KEY.txt`` member) or empty after
stripping whitespace is refused, with the file and the rows/samples named. Behind a flag
(``--drop-empty-captions``) such pairs are dropped instead, and the number dropped is logged. Before this
rule, a csv with an empty caption trained on the literal text "nan" (``str(NaN)``) while ``embed``
embedded "", so the two disagreed silently.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Sequence

from .errors import EmptyCaptionError

DROP_FLAG = "--drop-empty-captions"
SHOWN = 5                      # how many offending rows/samples a message names


def is_empty(caption) -> bool:
    """Missing (None, NaN) or only whitespace; bytes are decoded as UTF-8."""
    if caption is None:
        return True
    if isinstance(caption, float) and math.isnan(caption):
        return True
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return not str(caption).strip()


def empty_positions(captions: Iterable) -> List[int]:
    return [i for i, caption in enumerate(captions) if is_empty(caption)]


def refuse(where: str, labels: Sequence[str], total: int) -> EmptyCaptionError:
    """The error for ``labels`` (e.g. "row 3 (line 5)", "sample 000017") of ``where`` without a caption."""
    shown = ", ".join(labels[:SHOWN]) + (f" and {len(labels) - SHOWN} more" if len(labels) > SHOWN else "")
    return EmptyCaptionError(
        f"{where}: {len(labels)} of {total} pairs have an empty or missing caption ({shown}); write their "
        f"captions, remove those pairs, or pass {DROP_FLAG} to drop them (the number dropped is logged)")


def csv_row_label(position: int) -> str:
    """Data row ``position`` (0-based, as pandas counts) and its line in the file (header on line 1)."""
    return f"row {position} (line {position + 2})"
