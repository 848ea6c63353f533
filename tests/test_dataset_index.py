"""The one dataset-index range rule and the one dataset size (issue 30 item 2), on hand-worked cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openclip_align.data.dataset_index import (FIX_CSV_NUMBERING, check_index_range, dataset_size, outside)
from openclip_align.data.errors import CorpusError, MissingExtrasError


@pytest.mark.parametrize("low, high, total, bad", [
    (0, 9, 10, None),          # exactly [0, 10)
    (0, 10, 10, 10),           # one past the end
    (-1, 5, 10, -1),           # below zero is named first
    (-3, 12, 10, -3),
    (4, 4, 5, None),
])
def test_outside_names_the_first_index_out_of_range(low, high, total, bad):
    assert outside(low, high, total) == bad


def test_csv_indices_out_of_range_name_the_index_the_slots_and_the_csv_fix():
    check_index_range("x.csv", np.arange(48), 48, fix=FIX_CSV_NUMBERING)            # 0..47: fine
    check_index_range("x.csv", np.array([], dtype=np.int64), 0)                     # nothing to check
    with pytest.raises(MissingExtrasError) as caught:
        check_index_range("--loss sogclr: x.csv", np.array([3, 48, 7]), 48, fix=FIX_CSV_NUMBERING)
    assert str(caught.value) == (
        "--loss sogclr: x.csv: dataset index 48 is outside [0, 48); a loss that keeps per-sample state has one "
        "slot per training pair (48), addressed by this index. Number the pairs 0..N-1 (or drop the index "
        "column of a csv to use the row numbers)")


def test_one_shard_sample_index_is_checked_with_the_error_asked_for():
    check_index_range("shard a.tar sample k", 15, 16, error=CorpusError)
    with pytest.raises(CorpusError) as caught:
        check_index_range("shard a.tar sample k", np.int64(16), 16, error=CorpusError)
    assert str(caught.value) == (
        "shard a.tar sample k: dataset index 16 is outside [0, 16); a loss that keeps per-sample state has one "
        "slot per training pair (16), addressed by this index. Number the pairs 0..N-1")
    with pytest.raises(CorpusError, match=r"dataset index -2 is outside \[0, 16\)"):
        check_index_range("shard a.tar sample k", -2, 16, error=CorpusError)


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, i):
        return i


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_dataset_size_a_csv_dataset_counts_its_rows_shards_sum_their_sources():
    sizes = {"/a/{0..1}.tar": (30, 2), "/b/0.tar": (12, 1), "/c/0.tar": (None, 1)}

    def source_size(source):
        if source not in sizes:
            raise FileNotFoundError(source)
        return sizes[source]

    assert dataset_size("train.csv", source_size, _Rows()) == 7               # len(), sizes never read
    assert dataset_size("/a/{0..1}.tar::/b/0.tar", source_size, _Stream()) == 30 + 12
    assert dataset_size("/a/{0..1}.tar", source_size) == 30
    assert dataset_size("/a/{0..1}.tar::/c/0.tar", source_size) is None        # one source without a size
    assert dataset_size("/a/{0..1}.tar::/d/0.tar", source_size) is None        # one whose reader fails
