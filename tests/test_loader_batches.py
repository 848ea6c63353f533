"""Extras travel batched (issue 29): a batch's caption embeddings and dataset indices are collated inside
the loader worker into one tensor per name, so a batch crosses to the main process as a constant number of
shared-memory tensors (file descriptors) whatever its size; each row still belongs to its own sample."""
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from PIL import Image

import open_clip_train.data as oc_data
from openclip_align.data import csv_embeddings
from openclip_align.integration import batch_extras, training_shards

WIDTH = 8
NEEDS = {"semantic", "caption", "index"}


def _embedding(i: int) -> np.ndarray:
    """A known, distinct row per pair: its number, spelled into the vector."""
    return np.arange(WIDTH, dtype=np.float32) + 100.0 * i


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 0, 0)).save(buffer, format="PNG")     # the red channel names the pair
    return buffer.getvalue()


def _shards(folder: Path, parts):
    """Shards whose samples carry KEY.emb.npy and KEY.json index members; captions are "pair i"."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for shard, part in enumerate(parts):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in part:
                sink.write({"__key__": f"{i:09d}", "png": _png(i), "txt": f"pair {i}", "json": {"index": i},
                            "emb.npy": _embedding(i)})
        sizes[name] = len(part)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"shard-{{000000..{len(parts) - 1:06d}}}.tar")


def _args(pattern, **kw):
    base = dict(train_data=pattern, semantic_source="precomputed", semantic_model="all-MiniLM-L6-v2", loss="imsep",
                batch_size=8, workers=2, world_size=1, train_num_samples=None, dataset_resampled=False,
                drop_empty_captions=False, semantic_embeddings=None, distributed=False, seed=0,
                train_data_upsampling_factors=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _train_loader(args):
    """Upstream's own training pipeline, built as the trainer builds it with extras requested."""
    plan = training_shards.plan_training_shards(args, NEEDS, oc_data.expand_urls, oc_data.get_dataset_size)
    options = dict(shard_extras=training_shards.ShardSampleExtras(plan, NEEDS, "precomputed"))
    with batch_extras.requesting(NEEDS, **options):
        train = oc_data.get_wds_dataset(args, lambda image: torch.tensor([image.getpixel((0, 0))[0]]), is_train=True,
                                        tokenizer=lambda text: [torch.tensor([int(text.split()[1])])])
    return train.dataloader


def test_a_webdataset_batch_carries_one_stacked_tensor_per_extra_matched_to_its_samples(tmp_path):
    n = 64
    pattern = _shards(tmp_path, [range(0, 32), range(32, 64)])
    seen = []
    for images, texts, extras in _train_loader(_args(pattern, batch_size=16, workers=2)):
        assert isinstance(extras, dict) and set(extras) == NEEDS              # collated in the worker
        assert isinstance(extras["semantic"], torch.Tensor) and extras["semantic"].shape == (16, WIDTH)
        assert isinstance(extras["index"], torch.Tensor) and extras["index"].dtype == torch.int64
        assert isinstance(extras["caption"], list) and all(isinstance(c, str) for c in extras["caption"])
        pairs = [int(caption.split()[1]) for caption in extras["caption"]]   # each row's own sample, in order
        assert images[:, 0].tolist() == pairs and texts[:, 0].tolist() == pairs
        assert extras["index"].tolist() == pairs
        np.testing.assert_array_equal(extras["semantic"].numpy(), np.stack([_embedding(i) for i in pairs]))
        seen += pairs
    assert sorted(seen) == list(range(n))


def test_the_extras_loader_stashes_the_batch_as_it_came(tmp_path):
    pattern = _shards(tmp_path, [range(0, 16), range(16, 32)])
    stash = batch_extras.BatchStash()
    for images, texts in batch_extras.ExtrasLoader(_train_loader(_args(pattern, batch_size=8)), stash):
        taken = stash.take(8)
        assert taken["index"].tolist() == texts[:, 0].tolist()
        assert taken["semantic"][:, 0].tolist() == [100.0 * i for i in texts[:, 0].tolist()]


def test_collation_of_rows_with_mixed_and_missing_keys():
    rows = [{"index": 3, "caption": "a", "semantic": torch.full((2,), 3.0)},
            {"index": 5, "caption": "b"},                                     # no precomputed embedding
            {"index": 7, "caption": "c", "semantic": torch.full((2,), 7.0)}]
    out = batch_extras.collate_extras(rows)
    assert set(out) == {"index", "caption"}           # a key some sample lacks leaves the whole batch
    assert out["index"].tolist() == [3, 5, 7] and out["index"].dtype == torch.int64
    assert out["caption"] == ["a", "b", "c"]
    full = batch_extras.collate_extras([rows[0], rows[2]])
    assert full["semantic"].tolist() == [[3.0, 3.0], [7.0, 7.0]]
    assert batch_extras.collate_extras(full) is full                          # already collated: as it is
    assert batch_extras.collate_extras([]) == {}


def test_batch_collation_keeps_upstreams_images_and_texts():
    from webdataset.filters import default_collation_fn

    collate = batch_extras._CollateWithExtras(default_collation_fn)
    samples = [(torch.full((2,), float(i)), torch.tensor([i]), {"index": i, "caption": f"c{i}"}) for i in range(3)]
    images, texts, extras = collate(samples)
    assert images.tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]] and texts[:, 0].tolist() == [0, 1, 2]
    assert extras["index"].tolist() == [0, 1, 2] and extras["caption"] == ["c0", "c1", "c2"]
    plain = collate([(torch.zeros(2), torch.tensor([i])) for i in range(3)])   # no extras: upstream's result
    assert len(plain) == 2 and plain[0].shape == (3, 2)


def test_a_csv_batch_carries_one_stacked_tensor_per_extra(digits_csv, tmp_path):
    """The csv path: torch's default_collate stacks the extras dict in the worker too."""
    csv = tmp_path / "train.csv"
    rows = pd.read_csv(digits_csv, sep="\t")
    rows.to_csv(csv, sep="\t", index=False)
    vectors = np.stack([_embedding(i) for i in range(len(rows))])
    np.save(csv_embeddings.embedding_path(str(csv)), vectors)
    with batch_extras.requesting(NEEDS, csv_index_key="index", semantic_precomputed=True):
        dataset = oc_data.CsvDataset(str(csv), lambda image: torch.zeros(1), "filepath", "title",
                                     tokenizer=lambda texts: torch.zeros(len(texts), 1, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for _, _, extras in loader:
        assert isinstance(extras["semantic"], torch.Tensor) and extras["semantic"].shape == (16, WIDTH)
        assert isinstance(extras["index"], torch.Tensor)
        rows_here = extras["index"].tolist()                      # no index column: the row number
        assert extras["caption"] == [rows.title[i] for i in rows_here]
        np.testing.assert_array_equal(extras["semantic"].numpy(), vectors[rows_here])
        seen += rows_here
    assert sorted(seen) == list(range(len(rows)))
