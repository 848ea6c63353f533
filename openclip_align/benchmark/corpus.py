"""Which corpus a benchmark run used, so results are only ever compared with results of the same corpus.

A rebuild can change the corpus (another package version, another Open Clip Art draw: 6,811 pairs one day,
6,821 the next); numbers from two corpora differ for that reason alone. results.json records the sha256 of
the corpus manifest (canonical JSON, so formatting does not count) and the pair counts of the csv files the
run read; a corpus without a manifest is identified by its train.csv and heldout.csv bytes instead.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Tuple


def count_rows(csv: Path) -> int:
    with open(csv, encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1


def corpus_record(data_dir: Path) -> dict:
    manifest = data_dir / "manifest.json"
    digest = hashlib.sha256()
    if manifest.exists():
        digest.update(json.dumps(json.loads(manifest.read_text()), sort_keys=True).encode("utf-8"))
        source = "manifest.json"
    else:
        for name in ("train.csv", "heldout.csv"):
            if (data_dir / name).exists():
                digest.update((data_dir / name).read_bytes())
        source = "train.csv + heldout.csv"
    heldout = data_dir / "heldout.csv"
    return {"sha256": digest.hexdigest(), "sha256_of": source, "train_pairs": count_rows(data_dir / "train.csv"),
            "heldout_pairs": count_rows(heldout) if heldout.exists() else None}


def corpus_of(results: Optional[dict]) -> Optional[dict]:
    """The record a results.json carries; None for runs from before it was kept ("unknown corpus")."""
    return ((results or {}).get("data") or {}).get("corpus")


def describe(record: Optional[dict], results: Optional[dict] = None) -> str:
    if record is None:
        pairs = ((results or {}).get("data") or {}).get("train_pairs")
        return "unknown corpus" + (f" ({pairs:,} training pairs, no manifest hash recorded)" if pairs else "")
    heldout = f"{record['heldout_pairs']:,}" if record.get("heldout_pairs") is not None else "?"
    return (f"{record['train_pairs']:,} training / {heldout} held-out pairs, "
            f"{record['sha256_of']} sha256 {record['sha256'][:12]}")


def same_corpus(current: Optional[dict], baseline: Optional[dict]) -> Tuple[Optional[bool], str]:
    """(True, "") for the same corpus, (False, why) for another one, (None, why) when either is unknown."""
    now, before = corpus_of(current), corpus_of(baseline)
    if now is None or before is None:
        unknown = [f"{who}: {describe(None, results)}" for who, record, results in
                   (("this run", now, current), ("the baseline", before, baseline)) if record is None]
        return None, "; ".join(unknown)
    keys = ("sha256", "train_pairs", "heldout_pairs")
    if all(now.get(k) == before.get(k) for k in keys):
        return True, ""
    return False, f"the baseline used another corpus ({describe(before)}) than this run ({describe(now)})"
