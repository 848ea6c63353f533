"""Training throughput that survives a busy machine: configurations interleaved in short alternating windows.

Samples/s of one long run after another follow whatever else the machine was doing at the time (on a
2-core machine with load 4-6, upstream CLIP read 68 samples/s where an idle machine gives 400). Here every
configuration trains a few steps at a time (one *window*, a real trainer process) in turn, for several
rounds; the order rotates every round, so load that comes and goes hits every configuration alike. The
ratio to the baseline is taken within each round, and the report gives the median over rounds with its
spread (min and max). The machine's load average before and after the windows, and the CPU time other
processes took during them, say whether it was busy.
"""
from __future__ import annotations

import logging
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

# Other processes using more than this share of the cores during the windows: the report says "busy".
BUSY_SHARE = 0.25


@dataclass
class SpeedPlan:
    rounds: int = 3            # windows per configuration; the median ratio is over these
    samples: int = 1024        # training samples per window (16 steps of batch 64), every step logged ...
    min_steps: int = 4         # ... but at least this many steps (CLIP-Refine's batch 512)
    skip: int = 2              # first steps of a window not counted (start-up, caches), at most a third

    def steps(self, batch_size: int, available: int) -> int:
        """Steps of one window at this batch size, from a corpus of ``available`` pairs."""
        steps = min(max(self.min_steps, self.samples // batch_size), available // batch_size)
        if steps < 1:
            raise ValueError(f"a speed window needs at least one batch of {batch_size} pairs; the corpus has "
                             f"{available}")
        return steps

    def skipped_steps(self, steps: int) -> int:
        return min(self.skip, steps // 3)


def rotation(labels: Sequence[str], round_index: int) -> List[str]:
    """Round r starts with the r-th configuration, so over len(labels) rounds each holds every position once."""
    shift = round_index % len(labels) if labels else 0
    return list(labels[shift:]) + list(labels[:shift])


def interleave(labels: Sequence[str], window: Callable[[str, int], float], rounds: int,
               baseline: str) -> dict:
    """Run ``window(label, round)`` (samples/s) for every label, ``rounds`` times, rotating the order.

    A label whose window raises RuntimeError is dropped from later rounds and reported under ``skipped``
    with the error's last line; the baseline failing is an error (no ratio without it)."""
    if baseline not in labels:
        raise ValueError(f"speed baseline {baseline!r} is not among the configurations {list(labels)}")
    rates: Dict[str, List[Optional[float]]] = {label: [] for label in labels}
    skipped: Dict[str, str] = {}
    for r in range(rounds):
        for label in rotation(labels, r):
            if label in skipped:
                continue
            try:
                rates[label].append(window(label, r))
            except RuntimeError as err:
                if label == baseline:
                    raise
                lines = [line for line in str(err).splitlines() if line.strip()]
                skipped[label] = (lines[-1] if lines else str(err))[:200]
                logging.error("speed: %s failed, left out of the speed table: %s", label, skipped[label])
    out = {}
    for label in labels:
        if label in skipped:
            continue
        ratios = [rate / base for rate, base in zip(rates[label], rates[baseline])]
        out[label] = {"samples_per_second": statistics.median(rates[label]),
                      "samples_per_second_per_round": rates[label],
                      "ratio_to_upstream": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ratios)}
    return {"speed": out, "skipped": skipped}


# --- how busy the machine was ---------------------------------------------------------------------------

def _busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes have used since boot (Linux /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")       # user..steal; guest is inside user


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of every child (and grandchild) it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class LoadMeter:
    """Load average before and after a stretch of work, and the cores other processes used meanwhile."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self.before = list(os.getloadavg())
        self._start = (time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds())

    def stop(self) -> dict:
        wall, busy, own = time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds()
        others = None
        if busy is not None and self._start[1] is not None and wall > self._start[0]:
            others = max(0.0, ((busy - self._start[1]) - (own - self._start[2])) / (wall - self._start[0]))
        return conditions(self.cpus, self.before, list(os.getloadavg()), others)


def conditions(cpus: int, load_before: List[float], load_after: List[float], other_cores: Optional[float]) -> dict:
    """The record results.json keeps; ``busy`` when other processes took more than BUSY_SHARE of the cores
    (or, without /proc/stat, when the 1-minute load before the windows already exceeded half of them)."""
    if other_cores is not None:
        busy = other_cores > BUSY_SHARE * cpus
    else:
        busy = load_before[0] > 0.5 * cpus
    return {"cpus": cpus, "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in load_after],
            "other_processes_cores": None if other_cores is None else round(other_cores, 2), "busy": busy}


def conditions_line(record: dict) -> str:
    """One sentence for the report."""
    before, after = record["load_before"], record["load_after"]
    text = (f"load average (1 / 5 / 15 min) {before[0]:.1f} / {before[1]:.1f} / {before[2]:.1f} before the "
            f"windows and {after[0]:.1f} / {after[1]:.1f} / {after[2]:.1f} after, on {record['cpus']} CPU cores")
    if record.get("other_processes_cores") is not None:
        text += f"; other processes used {record['other_processes_cores']:.2f} cores meanwhile"
    if record["busy"]:
        return ("⚠ The machine was busy during the speed windows (" + text + "): absolute samples/s are low; "
                "the ratios, taken within each round, are what carries over.")
    return "The machine was quiet during the speed windows (" + text + ")."


# --- the windows' data ----------------------------------------------------------------------------------

def window_csv(train_csv: Path, rows: int, out_dir: Path) -> Path:
    """The first ``rows`` pairs of ``train_csv`` (tab-separated, as the trainer reads it by default) with the
    matching rows of its caption embeddings, if any, so a window is ``rows / batch`` steps of one epoch.
    An ``index`` column is renumbered 0..rows-1 (it addresses per-pair state of that many pairs)."""
    import pandas as pd

    from openclip_align.data.csv_embeddings import embedding_path

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"window-{rows}.csv"
    table = pd.read_csv(train_csv, sep="\t", nrows=rows)
    if len(table) < rows:
        raise ValueError(f"{train_csv} has {len(table)} pairs; a speed window needs {rows}")
    if "index" in table.columns:
        table["index"] = range(rows)
    table.to_csv(target, sep="\t", index=False)
    embeddings = Path(embedding_path(str(train_csv)))
    if embeddings.exists():
        np.save(embedding_path(str(target)), np.load(embeddings, mmap_mode="r")[:rows])
    return target
