"""Which corpus a benchmark run used, so results are compared only with results of the same pairs.

The identity is the corpus's content hash (:mod:`openclip_align.data.content`: split, caption and image bytes of
every pair), recorded in manifest.json by ``data build`` and copied into results.json. The manifest's format
version, its sha256 and the package versions it records sit beside it: two runs on the same pairs are compared
even when those differ, and the report names each difference. A baseline recorded before content hashes is
compared by its manifest sha256, as it was then (or by a content hash added to it later, with a note saying how
it was obtained). A corpus without a manifest is hashed from its files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Optional, Tuple


def count_rows(csv: Path) -> int:
    with open(csv, encoding="utf-8") as fh:
        return sum(1 for _ in fh) - 1


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest as canonical JSON (formatting does not count)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()


def corpus_record(data_dir: Path) -> dict:
    """The corpus record results.json keeps: content hash and pair counts, then how the corpus was built."""
    from openclip_align.data.content import content_of_files

    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else None
    content = (manifest or {}).get("content")
    content_from = "manifest.json"
    if not content:                  # built before the hash existed, or by another tool: hash the files
        content, content_from = content_of_files(data_dir), "the corpus files, at the run"
    heldout = data_dir / "heldout.csv"
    record = {"content_sha256": content["sha256"], "content_order_sha256": content.get("order_sha256"),
              "content_pairs": content["pairs"], "content_from": content_from,
              "train_pairs": count_rows(data_dir / "train.csv"),
              "heldout_pairs": count_rows(heldout) if heldout.exists() else None}
    if manifest is not None:
        encoder = manifest.get("encoder")
        record.update(sha256=manifest_sha256(manifest), sha256_of="manifest.json",
                      manifest_format_version=manifest.get("format_version"), packages=manifest.get("packages"),
                      encoder=encoder.get("model") if isinstance(encoder, dict) else None)
    return record


def corpus_of(results: Optional[dict]) -> Optional[dict]:
    """The record a results.json carries; None for runs from before it was kept ("unknown corpus")."""
    return ((results or {}).get("data") or {}).get("corpus")


def describe(record: Optional[dict], results: Optional[dict] = None) -> str:
    if record is None:
        pairs = ((results or {}).get("data") or {}).get("train_pairs")
        return "unknown corpus" + (f" ({pairs:,} training pairs, no manifest hash recorded)" if pairs else "")
    heldout = f"{record['heldout_pairs']:,}" if record.get("heldout_pairs") is not None else "?"
    ids = []
    if record.get("content_sha256"):
        ids.append(f"content sha256 {record['content_sha256'][:12]}")
    if record.get("sha256"):
        ids.append(f"{record.get('sha256_of', 'manifest.json')} sha256 {record['sha256'][:12]}")
    return f"{record['train_pairs']:,} training / {heldout} held-out pairs, " + ", ".join(ids)


def _encoder(results: Optional[dict], record: dict) -> Optional[str]:
    return record.get("encoder") or ((results or {}).get("data") or {}).get("encoder")


def build_differences(now: dict, before: dict) -> List[str]:
    """How two builds of the same pairs differ: manifest format version and package versions (shown in the
    report, never a reason not to compare)."""
    out = []
    if now.get("sha256") and before.get("sha256") and now["sha256"] != before["sha256"]:
        out.append(f"manifest sha256 {before['sha256'][:12]} -> {now['sha256'][:12]}")
    a, b = before.get("manifest_format_version"), now.get("manifest_format_version")
    if a != b and a is not None and b is not None:
        out.append(f"manifest format version {a} -> {b}")
    if before.get("content_order_sha256") and now.get("content_order_sha256") \
            and before["content_order_sha256"] != now["content_order_sha256"]:
        out.append("the same pairs in another row order (training batches differ as with another seed)")
    old, new = before.get("packages") or {}, now.get("packages") or {}
    if old and new:
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                out.append(f"{name} {old.get(name) or 'absent'} -> {new.get(name) or 'absent'}")
    return out


def same_corpus(current: Optional[dict], baseline: Optional[dict]) -> Tuple[Optional[bool], str, List[str]]:
    """(True, how it was matched, build differences) for the same pairs, (False, why, []) for other pairs,
    (None, why, []) when either is unknown."""
    now, before = corpus_of(current), corpus_of(baseline)
    if now is None or before is None:
        unknown = [f"{who}: {describe(None, results)}" for who, record, results in
                   (("this run", now, current), ("the baseline", before, baseline)) if record is None]
        return None, "; ".join(unknown), []
    counts = all(now.get(k) == before.get(k) for k in ("train_pairs", "heldout_pairs"))
    encoders = [_encoder(current, now), _encoder(baseline, before)]
    if None not in encoders and encoders[0] != encoders[1]:      # the same pairs, other caption embeddings
        return False, (f"the baseline's caption embeddings come from {encoders[1]}, this run's from {encoders[0]} "
                       "(AlignCLIP trains on them)"), []
    if now.get("content_sha256") and before.get("content_sha256"):
        if counts and now["content_sha256"] == before["content_sha256"]:
            how = f"same pairs: content sha256 {now['content_sha256'][:12]}"
            if before.get("content_note"):
                how += f" (the baseline's: {before['content_note']})"
            return True, how, build_differences(now, before)
        return False, (f"the baseline used other pairs ({describe(before)}) than this run ({describe(now)})"), []
    if counts and now.get("sha256") and now.get("sha256") == before.get("sha256"):
        return True, f"same manifest sha256 {now['sha256'][:12]} (no content hash recorded)", []
    return False, (f"the baseline used another corpus ({describe(before)}) than this run ({describe(now)}); "
                   "the baseline recorded no content hash, so only its manifest could be compared"), []
