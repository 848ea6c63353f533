"""The per-pair extras side channel: stash order under gradient accumulation, collation, identity."""
import pytest
import torch

from openclip_align.data.errors import MissingExtrasError
from openclip_align.integration.batch_extras import BatchStash, collate_extras


def _batch(start, n):
    rows = range(start, start + n)
    return (torch.zeros(n, 3, 2, 2), torch.tensor([[r] for r in rows]),
            {"index": torch.tensor(list(rows)), "caption": [f"c{r}" for r in rows]})


def test_take_concatenates_the_accumulated_batches_in_order():
    stash = BatchStash(depth=2)
    for start in (0, 4, 8):                      # the oldest batch falls out of a depth-2 stash
        stash.push(*_batch(start, 4))
    both = stash.take(8)
    assert both["index"].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert both["caption"] == [f"c{r}" for r in range(4, 12)]
    assert both["texts"][:, 0].tolist() == both["index"].tolist()
    assert stash.take(4)["index"].tolist() == [8, 9, 10, 11]
    with pytest.raises(MissingExtrasError, match="features for 6 pairs"):
        stash.take(6)


def test_generation_identifies_batches_not_tensor_addresses():
    stash = BatchStash(depth=1)
    images, texts, extras = _batch(0, 2)
    stash.push(images, texts, extras)
    first = stash.take(2)["generation"]
    assert stash.take(2)["generation"] == first           # same step: same key (the loss may cache)
    stash.push(images, texts, extras)                      # the very same tensor objects, a new step
    assert stash.take(2)["generation"] != first


def test_collate_rows_of_extras():
    rows = [{"index": 3, "caption": "a", "semantic": torch.ones(2)},
            {"index": 5, "caption": "b", "semantic": torch.zeros(2)}]
    out = collate_extras(rows)
    assert out["index"].tolist() == [3, 5] and out["caption"] == ["a", "b"]
    assert out["semantic"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert set(collate_extras([{"index": 1}, {"index": 2, "caption": "x"}])) == {"index"}
