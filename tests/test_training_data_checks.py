"""Training data refused by name before step 1, never a hang or a silent fallback (issue 16).

Unit level: the host-side scan of shards and the csv dataset, on real digit scans; end to end: the
trainer stops before its first step with the message, and writes nothing."""
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

import open_clip_train.data as oc_data
from openclip_align.data.captions import EmptyCaptionError
from openclip_align.integration import data_checks, trainer_run
from openclip_align.integration.batch_extras import MissingExtrasError
from openclip_align.integration.data_checks import TrainingDataError, scan_training_shards

WIDTH = 384


def _vectors(n, width=WIDTH, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_shards(folder: Path, csv: Path, parts, emb=None, sizes=True, meta_width=WIDTH, edit=None):
    """Shards of the digit scans in ``csv`` (``parts``: row ranges, one per shard) with txt/json/emb.npy
    members; ``edit(i, sample)`` may change a sample. Returns the brace pattern for --train-data."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.read_csv(csv, sep="\t")
    emb = _vectors(len(rows)) if emb is None else emb
    counts = {}
    for shard, part in enumerate(parts):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in part:
                sample = {"__key__": f"{i:09d}", "png": Path(rows.filepath[i]).read_bytes(), "txt": rows.title[i],
                          "json": {"index": i}, "emb.npy": emb[i]}
                if edit is not None:
                    edit(i, sample)
                sink.write(sample)
        counts[name] = len(part)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps(counts))
    if meta_width:
        (folder / "embeddings.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": meta_width}))
    last = len(parts) - 1
    return str(folder / f"shard-{{000000..{last:06d}}}.tar") if last else str(folder / "shard-000000.tar")


def _args(train_data, **kw):
    base = dict(train_data=train_data, semantic_source="precomputed", semantic_model="all-MiniLM-L6-v2",
                loss="imsep", batch_size=8, workers=0, world_size=1, train_num_samples=None,
                dataset_resampled=False, drop_empty_captions=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _scan(args, semantic=True, index=False):
    return scan_training_shards(args, semantic, index, oc_data)


# --- per-pair extras -----------------------------------------------------------------------------
def test_clean_shards_pass_and_report_what_they_hold(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    scan = _scan(_args(pattern), index=True)
    assert scan.samples == 48 and scan.width == WIDTH and not scan.without_embedding and not scan.dropped


@pytest.mark.parametrize("width, meta, match", [
    (768, WIDTH, r"width 768, but .*embeddings.json records width 384"),          # the .emb.json disagrees
    (1, None, r"width 1; a 1-wide normalised embedding"),                         # the IMSep term would vanish
    (768, None, None),                                                            # no metadata: nothing to compare
])
def test_embedding_width_against_the_metadata(digits_csv, tmp_path, width, meta, match):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], emb=_vectors(48, width), meta_width=meta)
    if match is None:
        assert _scan(_args(pattern)).width == 768
    else:
        with pytest.raises(MissingExtrasError, match=match):
            _scan(_args(pattern))


def test_width_against_the_encoder_named_in_the_metadata(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], emb=_vectors(48, 768), meta_width=None)
    (tmp_path / "embeddings.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2"}))    # 384 wide
    with pytest.raises(MissingExtrasError, match="names the encoder all-MiniLM-L6-v2, whose embeddings have width 384"):
        _scan(_args(pattern))


def test_one_member_of_another_width_is_named(digits_csv, tmp_path):
    wide = _vectors(48, 768)

    def edit(i, sample):
        if i == 13:
            sample["emb.npy"] = wide[i]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)], edit=edit)
    with pytest.raises(MissingExtrasError, match=r"shard-000000.tar sample 000000013: KEY.emb.npy has width 768, "
                                                 r"the samples before it width 384"):
        _scan(_args(pattern))


def test_a_nan_row_is_refused_before_step_1(digits_csv, tmp_path):
    emb = _vectors(48)
    emb[30, 5] = np.nan
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)], emb=emb)
    with pytest.raises(MissingExtrasError, match=r"shard-000001.tar sample 000000030: KEY.emb.npy holds non-finite"):
        _scan(_args(pattern))


def test_a_sample_without_its_embedding(digits_csv, tmp_path, caplog):
    def edit(i, sample):
        if i in (5, 40):
            del sample["emb.npy"]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)], edit=edit)
    with pytest.raises(MissingExtrasError, match=r"precomputed: 2 of 48 .*sample 000000005.*sample 000000040.*"
                                                 r"--semantic-source auto"):
        _scan(_args(pattern))
    scan = _scan(_args(pattern, semantic_source="auto"))           # auto: accepted, and said
    assert len(scan.without_embedding) == 2
    train = SimpleNamespace(dataloader=SimpleNamespace(num_batches=6))
    with caplog.at_level(logging.INFO):
        data_checks.log_on_the_fly(_args(pattern, semantic_source="auto"), train, scan)
    assert "up to 2 of the 6 batches per epoch are embedded on the fly by --semantic-model all-MiniLM-L6-v2, " \
           "because 2 of 48 samples have no KEY.emb.npy" in caplog.text
    assert _scan(_args(pattern, semantic_source="on-the-fly")).without_embedding == []   # members not read


def test_auto_mixing_needs_the_same_encoder_width(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 3:
            del sample["emb.npy"]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], edit=edit)
    with pytest.raises(MissingExtrasError, match="--semantic-model all-mpnet-base-v2, which embeds the 1 samples"):
        _scan(_args(pattern, semantic_source="auto", semantic_model="all-mpnet-base-v2"))


def test_missing_and_duplicate_indices_are_named(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 2:
            sample["json"] = {"caption": "no index"}
        if i == 9:
            sample["json"] = {"index": 8}
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], edit=edit)
    with pytest.raises(MissingExtrasError, match=r"sample 000000002 \(no KEY.json.*sample 000000009 \(index 8 also in"):
        _scan(_args(pattern, loss="sogclr"), semantic=False, index=True)


# --- captions --------------------------------------------------------------------------------------
def test_empty_captions_in_shards_refused_or_dropped_and_counted(digits_csv, tmp_path, caplog):
    def edit(i, sample):
        if i == 4:
            sample["txt"] = "   "
        if i == 20:
            del sample["txt"]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24)], edit=edit)
    with pytest.raises(EmptyCaptionError, match=r"2 of 24 pairs .*sample 000000004.*sample 000000020.*"
                                                r"--drop-empty-captions"):
        _scan(_args(pattern), semantic=False)
    with caplog.at_level(logging.WARNING):
        scan = _scan(_args(pattern, drop_empty_captions=True), semantic=False)
    assert scan.dropped == {(pattern, "000000004"), (pattern, "000000020")}
    assert "dropped 2 of 24 training samples" in caplog.text
    # the filter upstream's pipeline runs while --drop-empty-captions is on, over the real shard stream
    keep = data_checks.SkipListed(oc_data.filter_no_caption_or_no_image, scan.dropped)
    stream = wds.DataPipeline(wds.SimpleShardList(pattern), wds.tarfile_to_samples(), wds.select(keep))
    assert [s["__key__"] for s in stream] == [f"{i:09d}" for i in range(24) if i not in (4, 20)]


def _csv_dataset(path):
    return oc_data.CsvDataset(str(path), transforms=lambda image: image, img_key="filepath", caption_key="title",
                              tokenizer=lambda texts: texts)


def test_empty_csv_caption_refused_with_its_row_or_dropped(digits_csv, tmp_path, monkeypatch, caplog):
    rows = pd.read_csv(digits_csv, sep="\t")
    rows.loc[[3, 7], "title"] = ["", " "]
    csv = tmp_path / "train.csv"
    rows.to_csv(csv, sep="\t", index=False)
    with pytest.raises(EmptyCaptionError, match=r"2 of 48 pairs .*row 3 \(line 5\), row 7 \(line 9\)"):
        _csv_dataset(csv)
    monkeypatch.setattr(trainer_run, "RUN", SimpleNamespace(args=SimpleNamespace(drop_empty_captions=True)))
    with caplog.at_level(logging.WARNING):
        dataset = _csv_dataset(csv)
    assert len(dataset) == 46 and "dropped 2 of 48 pairs" in caplog.text
    assert "nan" not in [str(c) for c in dataset.captions]
    assert dataset.captions[3] == rows.title[4]                       # rows after a dropped one shift up


# --- sizes -------------------------------------------------------------------------------------------
def test_fewer_samples_than_one_batch_is_an_error_not_a_hang(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 29)])
    with pytest.raises(TrainingDataError, match="hold 29 usable samples, fewer than one batch of 32"):
        _scan(_args(pattern, batch_size=32), semantic=False)


def test_a_worker_dealt_too_few_samples_is_an_error(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 30)])
    with pytest.raises(TrainingDataError, match="deal a worker as few as 1 shard.* holding 6 samples"):
        _scan(_args(pattern, batch_size=8, workers=2), semantic=False)
    assert _scan(_args(pattern, batch_size=8, workers=1), semantic=False).samples == 30


def test_shards_holding_fewer_samples_than_sizes_json_claims(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 40)])
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"shard-000000.tar": 24, "shard-000001.tar": 24}))
    with pytest.raises(TrainingDataError, match=r"says .*shard-000001.tar holds 24 samples, but it holds 16"):
        _scan(_args(pattern), semantic=False)
    assert json.loads(sizes.read_text())["shard-000001.tar"] == 24         # the file is the user's: untouched
    assert _scan(_args(pattern, train_num_samples=40), semantic=False).samples == 40   # not read then


def test_a_truncated_shard_file_is_named(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24)], sizes=False)
    data = Path(pattern).read_bytes()
    Path(pattern).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(TrainingDataError, match=r"shard-000000.tar cannot be read to its end .*truncated"):
        _scan(_args(pattern), semantic=False)


def test_csv_smaller_than_one_batch():
    train = SimpleNamespace(dataloader=SimpleNamespace(num_batches=0, dataset=list(range(12))))
    with pytest.raises(TrainingDataError, match="12 training pairs make no full batch of --batch-size 16"):
        data_checks.check_has_a_batch(SimpleNamespace(train_data="x.csv", batch_size=16, world_size=1), train)


# --- end to end: the trainer stops before step 1 -------------------------------------------------------
def _train(argv, logs: Path, name: str):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", "AlignCLIP-Tiny", "--workers", "0",
           "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1",
           "--epochs", "1", *argv, "--logs", str(logs), "--name", name]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_trainer_refuses_bad_shards_before_step_1(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 5:
            del sample["emb.npy"]
    pattern = write_shards(tmp_path / "missing", digits_csv, [range(0, 24), range(24, 48)], edit=edit)
    out = _train(["--loss", "imsep", "--train-data", pattern, "--dataset-type", "webdataset", "--batch-size", "16",
                  "--semantic-source", "precomputed"], tmp_path / "logs", "missing")
    assert out.returncode != 0 and "sample 000000005" in out.stderr and "Train Epoch" not in out.stdout + out.stderr

    small = write_shards(tmp_path / "small", digits_csv, [range(0, 29)])       # 29 samples, batch 32: no hang
    out = _train(["--train-data", small, "--dataset-type", "webdataset", "--batch-size", "32"], tmp_path / "logs", "small")
    assert out.returncode != 0 and "fewer than one batch of 32" in out.stderr
    assert not list((tmp_path / "logs").rglob("*.pt"))


def test_trainer_refuses_an_empty_csv_caption_instead_of_training_on_nan(digits_csv, tmp_path):
    rows = pd.read_csv(digits_csv, sep="\t")
    rows.loc[10, "title"] = None
    csv = tmp_path / "train.csv"
    rows.to_csv(csv, sep="\t", index=False)
    out = _train(["--train-data", str(csv), "--dataset-type", "csv", "--batch-size", "16"], tmp_path / "logs", "nan")
    assert out.returncode != 0 and "row 10 (line 12)" in out.stderr and "Train Epoch" not in out.stdout + out.stderr


def test_sogclr_on_shards_without_sizes_json_counts_the_shards(digits_csv, tmp_path):
    """SogCLR sizes its per-sample state by what the shards actually hold when there is no sizes.json."""
    import torch

    pattern = write_shards(tmp_path, digits_csv, [range(0, 16), range(16, 32)], sizes=False)
    out = _train(["--loss", "sogclr", "--train-data", pattern, "--dataset-type", "webdataset", "--batch-size", "16",
                  "--train-num-samples", "16"], tmp_path / "logs", "sog")     # one step; the epoch length only
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "logs" / "sog" / "checkpoints" / "epoch_1.pt", map_location="cpu",
                            weights_only=False)
    assert checkpoint["optimizer"]["openclip_align"]["state"]["log_s_image"].shape == (32,)


@pytest.mark.parametrize("width, meta_dim, match", [
    (768, 384, r"train.emb.npy: embeddings of width 768, but .*train.emb.json records width 384"),
    (1, None, r"train.emb.npy: semantic embeddings of width 1"),
])
def test_csv_embeddings_of_the_wrong_width(digits_csv, tmp_path, width, meta_dim, match):
    from openclip_align.integration import batch_extras

    csv = tmp_path / "train.csv"
    csv.write_text(digits_csv.read_text())
    np.save(tmp_path / "train.emb.npy", _vectors(48, width))
    if meta_dim:
        (tmp_path / "train.emb.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": meta_dim, "n": 48}))
    with batch_extras.requesting({"semantic", "caption"}, semantic_precomputed=True, semantic_on_the_fly=False):
        with pytest.raises(MissingExtrasError, match=match):
            _csv_dataset(csv)
    np.save(tmp_path / "train.emb.npy", _vectors(48, 384))               # the right file passes
    with batch_extras.requesting({"semantic", "caption"}, semantic_precomputed=True, semantic_on_the_fly=False):
        assert _csv_dataset(csv)[0][2]["semantic"].shape == (384,)
