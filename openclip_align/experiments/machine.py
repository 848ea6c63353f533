"""What a run records about the machine it ran on (cores, load at its start and end), so that reports and
README say only what was recorded."""
from __future__ import annotations

import os
from typing import List, Optional


def load() -> Optional[List[float]]:
    """The 1 / 5 / 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def at_start() -> dict:
    return {"cpus": os.cpu_count(), "load_at_start": load()}


def at_end(record: dict) -> dict:
    return {**record, "load_at_end": load()}
