"""The caption-embedding column beside the shards, joined to each sample by shard url and key inside
upstream's own webdataset pipeline (issue 23). A broken column stops the run before step 1 (recorded
shards) or at the first affected sample (others), naming shard and key."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import open_clip_train.data as oc_data
from openclip_align.data.column import encode_fingerprints, write_column
from openclip_align.data.errors import CorpusError
from openclip_align.integration import batch_extras, training_shards

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shard_fixtures import (WIDTH, decoded_extras, plan_shards, record_shards, shard_args,  # noqa: E402
                             unit_vectors, write_shards)

N = 48
EMB = unit_vectors(N)


def _columned(folder: Path, csv, parts, column_dir=None, with_index=False, edit=None, emb=EMB):
    """Shards without KEY.emb.npy members (captions "pair i") and, per shard, the column `embed` writes."""
    def strip(i, sample):
        del sample["emb.npy"]
        sample["txt"] = f"pair {i}"
        if not with_index:
            sample["json"] = {"source": "digits"}
    pattern = write_shards(folder, csv, parts, edit=strip)
    for shard, part in enumerate(parts):
        keys = [f"{i:09d}" for i in part]
        rows = [i for i in part if edit is None or edit(i)]
        write_column(str(folder / f"shard-{shard:06d}.tar"), column_dir, [f"{i:09d}" for i in rows],
                     emb[rows], model="all-MiniLM-L6-v2", index_start=part[0], shard_keys=keys,
                     captions=[f"pair {i}" for i in rows],
                     shard_captions=[f"pair {i}" for i in part])
    return pattern


def test_column_joined_by_key_through_upstream_shuffling_resampling_and_workers(digits_csv, tmp_path):
    """Every training sample gets the row of its own key and the index of its own pair: its caption names
    the pair, so the expectation does not go through the join."""
    pattern = _columned(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    args = shard_args(pattern, loss="sogclr", batch_size=8, workers=2, dataset_resampled=True,
                      train_num_samples=N, seed=0, world_size=1, train_data_upsampling_factors=None)
    needs = {"semantic", "caption", "index"}
    plan = training_shards.plan_training_shards(args, needs, oc_data.expand_urls, oc_data.get_dataset_size)
    options = dict(shard_extras=training_shards.ShardSampleExtras(plan, needs, "precomputed"))
    with batch_extras.requesting(needs, **options):
        train = oc_data.get_wds_dataset(args, lambda image: np.zeros(1, np.float32), is_train=True,
                                        tokenizer=lambda texts: [0])
    seen = 0
    for _, _, extras in train.dataloader:
        extras = batch_extras.collate_extras(extras)
        pairs = [int(c.split()[1]) for c in extras["caption"]]
        assert extras["index"].tolist() == pairs                       # index_start + row of its key
        np.testing.assert_allclose(extras["semantic"].numpy(), EMB[pairs], atol=2e-3)   # float16 rows
        seen += len(pairs)
    assert seen == N


def test_a_column_of_other_captions_stops_the_workers_at_the_first_sample(digits_csv, tmp_path):
    """Through upstream's own pipeline (2 workers): the caption the trainer sees is checked against the
    row's fingerprint; a column whose row 30 was made from another caption stops at sample 30."""
    pattern = _columned(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    json_path = tmp_path / "shard-000001.emb.json"
    meta = json.loads(json_path.read_text())
    meta["caption_fingerprints"] = encode_fingerprints(
        [f"pair {i}" if i != 30 else "a caption from another export" for i in range(24, 48)])
    json_path.write_text(json.dumps(meta))
    args = shard_args(pattern, loss="imsep", batch_size=8, workers=2, train_num_samples=N, seed=0,
                      world_size=1, dataset_resampled=False, train_data_upsampling_factors=None)
    needs = {"semantic", "caption"}
    plan = training_shards.plan_training_shards(args, needs, oc_data.expand_urls, oc_data.get_dataset_size)
    options = dict(shard_extras=training_shards.ShardSampleExtras(plan, needs, "precomputed"))
    with batch_extras.requesting(needs, **options):
        train = oc_data.get_wds_dataset(args, lambda image: np.zeros(1, np.float32), is_train=True,
                                        tokenizer=lambda texts: [0])
    with pytest.raises(CorpusError, match=r"shard-000001.tar sample 000000030: its caption 'pair 30' is not the "
                                          r"caption row 6 of .*shard-000001.emb.npy was made from"):
        for _ in train.dataloader:
            pass


def test_column_with_a_missing_row(digits_csv, tmp_path):
    pattern = _columned(tmp_path, digits_csv, [range(0, 24), range(24, 48)], edit=lambda i: i != 30)
    with pytest.raises(CorpusError, match=r"shard-000001.tar sample 000000030 has no row in the column"):
        decoded_extras(pattern, shard_args(pattern))                    # not recorded: at that sample
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"shard-000001.tar: its column has 23 rows and 0 dropped samples for "
                                          r"the shard's 24 samples"):
        plan_shards(shard_args(pattern))                                # recorded: before step 1


def test_column_of_another_width(digits_csv, tmp_path):
    pattern = _columned(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    write_column(str(tmp_path / "shard-000001.tar"), None, [f"{i:09d}" for i in range(24, 48)],
                 unit_vectors(24, 768), model="all-mpnet-base-v2", index_start=24)
    with pytest.raises(CorpusError, match=r"shard-000001.tar: its column .*has width 768, expected 384"):
        decoded_extras(pattern, shard_args(pattern))
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"shard-000001.tar: caption embeddings of width 768, the shards before it "
                                          r"width 384"):
        plan_shards(shard_args(pattern))


def test_column_of_another_shard(digits_csv, tmp_path):
    pattern = _columned(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    for suffix in (".emb.npy", ".emb.json"):
        shutil.copy(tmp_path / f"shard-000001{suffix}", tmp_path / f"shard-000000{suffix}")
    with pytest.raises(CorpusError, match=r"shard-000000.emb.json is the column of shard shard-000001.tar, not of "
                                          r"shard-000000.tar"):
        decoded_extras(pattern, shard_args(pattern))
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"is the column of shard shard-000001.tar, not of shard-000000.tar"):
        plan_shards(shard_args(pattern))


def test_column_in_another_directory_with_semantic_embeddings(digits_csv, tmp_path):
    columns = tmp_path / "columns"
    pattern = _columned(tmp_path / "shards", digits_csv, [range(0, 24), range(24, 48)], column_dir=str(columns))
    with pytest.raises(CorpusError, match=r"no embedding column .*or pass --semantic-embeddings DIR"):
        decoded_extras(pattern, shard_args(pattern))
    rows = decoded_extras(pattern, shard_args(pattern, semantic_embeddings=str(columns)), index=True)
    assert [r["index"] for r in rows] == list(range(N))
    np.testing.assert_allclose(np.stack([r["semantic"].numpy() for r in rows]), EMB, atol=2e-3)
    assert plan_shards(shard_args(pattern, semantic_embeddings=str(columns))).width == WIDTH
