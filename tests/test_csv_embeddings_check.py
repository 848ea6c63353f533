"""A csv's caption embeddings are checked for NaN/inf at write time; the trainer reads the rows only when the
file has no matching record, and then on rank 0 alone (issue 29 item 6)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _dist import spawn  # noqa: E402

from openclip_align.data import csv_embeddings  # noqa: E402
from openclip_align.integration import batch_extras  # noqa: E402
from openclip_align.data.errors import MissingExtrasError  # noqa: E402


def _write(folder: Path, rows: int = 600, bad_row=None, record: bool = True) -> Path:
    """train.emb.npy (600 x 512 float32: 1.2 MB, larger than the two hashed MiB at its ends) and, with
    ``record``, the .emb.json the embed writer makes."""
    emb = np.random.default_rng(0).standard_normal((rows, 512)).astype(np.float32)
    if bad_row is not None:
        emb[bad_row, 3] = np.nan
    path = folder / "train.emb.npy"
    np.save(path, emb)
    if record:
        meta = {"model": "all-MiniLM-L6-v2", "dim": 512, "n": rows, "normalized": True,
                csv_embeddings.FILE_RECORD: csv_embeddings.file_record(path, emb)}
        (folder / "train.emb.json").write_text(json.dumps(meta))
    return path


def test_the_record_holds_size_the_hash_of_both_ends_and_finiteness(tmp_path):
    path = _write(tmp_path)
    data = path.read_bytes()
    mib = 1 << 20
    record = json.loads((tmp_path / "train.emb.json").read_text())["file"]
    ends = data[:mib] + data[max(mib, len(data) - mib):]                # the last MiB, after the first one
    assert len(data) > mib and record == {"bytes": len(data), "ends_sha256": hashlib.sha256(ends).hexdigest(),
                                          "finite": True}
    assert csv_embeddings.recorded_finite(path, tmp_path / "train.emb.json") is True


def test_a_record_of_another_file_is_not_trusted(tmp_path):
    path = _write(tmp_path)
    meta = tmp_path / "train.emb.json"
    np.save(path, np.load(path)[:-1])                                   # one row fewer: another size
    assert csv_embeddings.recorded_finite(path, meta) is None
    path = _write(tmp_path)
    emb = np.load(path)
    emb[-1, 0] += 1.0                                                    # rewritten last row, same size
    np.save(path, emb)
    assert csv_embeddings.recorded_finite(path, meta) is None
    assert csv_embeddings.recorded_finite(path, tmp_path / "missing.json") is None


def test_a_file_the_writer_found_non_finite_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = _write(tmp_path, bad_row=5)
    monkeypatch.setattr(csv_embeddings, "non_finite_row", lambda *a: pytest.fail("read every row"))
    with pytest.raises(MissingExtrasError, match=r"train\.emb\.npy: `openclip-align embed` found non-finite"):
        batch_extras.check_embedding_file(str(path), np.load(path, mmap_mode="r"))


def test_a_file_matching_its_record_is_trusted_without_reading_it(tmp_path, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.setattr(csv_embeddings, "non_finite_row", lambda *a: pytest.fail("read every row"))
    batch_extras.check_embedding_file(str(path), np.load(path, mmap_mode="r"))


def test_a_file_without_a_record_is_read_and_its_non_finite_row_named(tmp_path):
    path = _write(tmp_path, bad_row=417, record=False)
    with pytest.raises(MissingExtrasError, match=r"train\.emb\.npy: row 417 holds non-finite values"):
        batch_extras.check_embedding_file(str(path), np.load(path, mmap_mode="r"), chunk_values=512 * 100)
    path = _write(tmp_path, record=False)
    batch_extras.check_embedding_file(str(path), np.load(path, mmap_mode="r"))       # finite: accepted


def _two_ranks_worker(rank, world_size, root):
    reads = []
    scan = csv_embeddings.non_finite_row
    csv_embeddings.non_finite_row = lambda *a: reads.append(rank) or scan(*a)
    path = Path(root, "train.emb.npy")
    try:
        batch_extras.check_embedding_file(str(path), np.load(path, mmap_mode="r"))
        outcome = "accepted"
    except MissingExtrasError as err:
        outcome = str(err)
    Path(root, f"rank{rank}.json").write_text(json.dumps({"reads": len(reads), "outcome": outcome}))


@pytest.mark.slow
def test_two_ranks_without_a_record_rank_0_reads_once_and_both_stop(tmp_path):
    _write(tmp_path, bad_row=9, record=False)
    spawn(_two_ranks_worker, 2, str(tmp_path), timeout=120)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["reads"] for g in got] == [1, 0]                         # rank 0 alone read the rows
    for g in got:
        assert g["outcome"] == "stopping on every rank: rank 0: " + str(tmp_path / "train.emb.npy") + \
            ": row 9 holds non-finite values (NaN or inf); recompute it with `openclip-align embed`"
