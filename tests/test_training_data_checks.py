"""Training data refused by name, never a hang or a silent fallback (issues 16 and 23).

What a shard's record vouches for is checked before step 1 in O(shards) (``training_shards``, through
``preflight.verify_record``); shards without a record are checked sample by sample as upstream's own
pipeline decodes them. Unit level on real digit scans; end to end: the trainer stops with the message
naming shard, key and fix, and nothing already written is lost."""
import builtins
import json
import logging
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import open_clip_train.data as oc_data
from _shard_fixtures import (WIDTH, decoded_extras, plan_shards, record_shards, shard_args, unit_vectors,
                             write_shards)
from _trainer_launch import error_lines, train, train_here
from openclip_align.integration import batch_extras, csv_checks, run_state, training_shards
from openclip_align.data.errors import CorpusError, EmptyCaptionError, MissingExtrasError, TrainingDataError


# --- per-pair extras: recorded shards, before step 1 ---------------------------------------------------
def test_clean_recorded_shards_pass_and_report_what_they_hold(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)])
    record_shards(tmp_path)
    plan = plan_shards(shard_args(pattern), index=True)
    assert plan.total == 48 and plan.width == WIDTH and not plan.unrecorded and not plan.check.dropped


@pytest.mark.parametrize("width, meta, match", [
    (768, WIDTH, r"width 768, but .*embeddings.json records width 384"),          # the metadata disagrees
    (1, None, r"width 1; a 1-wide normalised embedding"),                         # the IMSep term would vanish
    (768, None, None),                                                            # no metadata: nothing to compare
])
def test_embedding_width_against_the_metadata(digits_csv, tmp_path, width, meta, match):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], emb=unit_vectors(48, width), meta_width=meta)
    record_shards(tmp_path)
    if match is None:
        assert plan_shards(shard_args(pattern)).width == 768
    else:
        with pytest.raises(CorpusError, match=match):
            plan_shards(shard_args(pattern))


def test_width_against_the_encoder_named_in_the_metadata(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], emb=unit_vectors(48, 768), meta_width=None)
    (tmp_path / "embeddings.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2"}))    # 384 wide
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match="names the encoder all-MiniLM-L6-v2, whose embeddings have width 384"):
        plan_shards(shard_args(pattern))


def test_recorded_shard_without_embeddings_refused_or_embedded_on_the_fly(digits_csv, tmp_path, caplog):
    def edit(i, sample):
        if i in (5, 40):
            del sample["emb.npy"]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)], edit=edit)
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"precomputed: shard .*shard-000000.tar has no embedding column .*"
                                          r"KEY.emb.npy in only 23 of its 24 samples.*--semantic-source auto"):
        plan_shards(shard_args(pattern))
    with caplog.at_level(logging.INFO):                                 # auto: accepted, and said
        plan = plan_shards(shard_args(pattern, semantic_source="auto"))
    assert "the batches of 2 shards without precomputed embeddings" in " ".join(plan.notes)
    with pytest.raises(CorpusError, match="--semantic-model all-mpnet-base-v2, which embeds the samples of 2 shards"):
        plan_shards(shard_args(pattern, semantic_source="auto", semantic_model="all-mpnet-base-v2"))


def test_missing_and_duplicate_indices_are_named(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 9:
            sample["json"] = {"index": 8}
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], edit=edit)
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"shard-000000.tar holds samples sharing a KEY.json \"index\""):
        plan_shards(shard_args(pattern, loss="sogclr"), semantic=False, index=True)


def test_a_shard_changed_since_its_record_is_named(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24)], sizes=False)
    record_shards(tmp_path)
    data = Path(pattern).read_bytes()
    Path(pattern).write_bytes(data[: len(data) // 2 + 100])            # truncated after it was checked
    with pytest.raises(CorpusError, match=r"shard-000000.tar changed since it was checked.*data check"):
        plan_shards(shard_args(pattern), semantic=False)


# --- per-pair extras: shards without a record, as samples are decoded ---------------------------------
def test_unrecorded_shards_are_checked_as_decoded(digits_csv, tmp_path):
    wide = unit_vectors(48, 768)
    emb = unit_vectors(48)
    emb[30, 5] = np.nan

    def edit(i, sample):
        if i == 13:
            sample["emb.npy"] = wide[i]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 48)], emb=emb, edit=edit)
    with pytest.raises(CorpusError, match=r"shard-000000.tar sample 000000013: the caption embedding has width 768, "
                                          r"expected 384"):
        decoded_extras(pattern, shard_args(pattern))
    pattern = write_shards(tmp_path / "nan", digits_csv, [range(0, 24), range(24, 48)], emb=emb)
    with pytest.raises(CorpusError, match=r"shard-000001.tar sample 000000030: the caption embedding holds non-finite"):
        decoded_extras(pattern, shard_args(pattern))


def test_unrecorded_sample_without_index_or_embedding(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 2:
            sample["json"] = {"caption": "no index"}
        if i == 7:
            del sample["emb.npy"]
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], edit=edit)
    with pytest.raises(CorpusError, match=r"sample 000000002: the loss needs a per-pair dataset index.*`openclip-align "
                                          r"embed"):
        decoded_extras(pattern, shard_args(pattern, loss="sogclr"), semantic=False, index=True)
    with pytest.raises(CorpusError, match=r"shard-000000.tar: no embedding column"):
        decoded_extras(pattern, shard_args(pattern))
    # auto: that batch is embedded on the fly
    rows = decoded_extras(pattern, shard_args(pattern, semantic_source="auto"))
    assert [r["key"] for r in rows if "semantic" not in r] == ["000000007"] and len(rows) == 16


def test_unrecorded_index_outside_the_sizes_json_total(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 11:
            sample["json"] = {"index": 16}
    pattern = write_shards(tmp_path, digits_csv, [range(0, 16)], edit=edit)
    with pytest.raises(CorpusError, match=r"sample 000000011: dataset index 16 is outside \[0, 16\)"):
        decoded_extras(pattern, shard_args(pattern, loss="sogclr"), semantic=False, index=True)


# --- captions --------------------------------------------------------------------------------------
def test_empty_captions_in_recorded_shards_refused_or_dropped(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 4:
            sample["txt"] = "   "
        if i == 20:
            sample["txt"] = ""
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24)], edit=edit)
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match=r"2 of 24 recorded samples .*sample 000000004.*sample 000000020.*"
                                          r"--drop-empty-captions"):
        plan_shards(shard_args(pattern), semantic=False)
    args = shard_args(pattern, drop_empty_captions=True)
    plan = plan_shards(args, semantic=False)
    assert plan.check.dropped == {(pattern, "000000004"), (pattern, "000000020")}
    # the filter upstream's pipeline runs, over the real shard stream
    assert [r["key"] for r in decoded_extras(pattern, args, semantic=False)] == [
        f"{i:09d}" for i in range(24) if i not in (4, 20)]


def test_empty_caption_in_an_unrecorded_shard_stops_or_is_dropped_as_decoded(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 6:
            sample["txt"] = " \n"
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24)], edit=edit)
    with pytest.raises(CorpusError, match=r"shard .*shard-000000.tar sample 000000006 has an empty or missing "
                                          r"caption; .*--drop-empty-captions.*data check"):
        decoded_extras(pattern, shard_args(pattern), semantic=False)
    rows = decoded_extras(pattern, shard_args(pattern, drop_empty_captions=True), semantic=False)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(24) if i != 6]


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
    monkeypatch.setattr(run_state, "RUN", SimpleNamespace(args=SimpleNamespace(drop_empty_captions=True)))
    with caplog.at_level(logging.WARNING):
        dataset = _csv_dataset(csv)
    assert len(dataset) == 46 and "dropped 2 of 48 pairs" in caplog.text
    assert "nan" not in [str(c) for c in dataset.captions]
    assert dataset.captions[3] == rows.title[4]                       # rows after a dropped one shift up


# --- sizes -------------------------------------------------------------------------------------------
def test_fewer_samples_than_one_batch_is_an_error_not_a_hang(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 29)])
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match="hold 29 usable samples, fewer than one batch of 32"):
        plan_shards(shard_args(pattern, batch_size=32), semantic=False)


def test_a_worker_dealt_too_few_samples_is_an_error(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 30)])
    with pytest.raises(CorpusError, match="deal a worker as few as 1 shard.* holding 6 samples"):   # from sizes.json
        plan_shards(shard_args(pattern, batch_size=8, workers=2), semantic=False)
    record_shards(tmp_path)
    with pytest.raises(CorpusError, match="deal a worker as few as 1 shard.* holding 6 samples"):   # from the record
        plan_shards(shard_args(pattern, batch_size=8, workers=2), semantic=False)
    assert plan_shards(shard_args(pattern, batch_size=8, workers=1), semantic=False).total == 30


def test_shards_holding_fewer_samples_than_sizes_json_claims(digits_csv, tmp_path):
    pattern = write_shards(tmp_path, digits_csv, [range(0, 24), range(24, 40)])
    record_shards(tmp_path)
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"shard-000000.tar": 24, "shard-000001.tar": 24}))
    with pytest.raises(CorpusError, match=r"says .*shard-000001.tar holds 24 samples, but it holds 16"):
        plan_shards(shard_args(pattern), semantic=False)
    assert json.loads(sizes.read_text())["shard-000001.tar"] == 24         # the file is the user's: untouched
    assert plan_shards(shard_args(pattern, train_num_samples=40), semantic=False).total == 40  # the record's count


def test_csv_smaller_than_one_batch():
    train = SimpleNamespace(dataloader=SimpleNamespace(num_batches=0, dataset=list(range(12))))
    with pytest.raises(TrainingDataError, match="12 training pairs make no full batch of --batch-size 16"):
        csv_checks.check_has_a_batch(SimpleNamespace(train_data="x.csv", batch_size=16, world_size=1), train)


# --- end to end: the trainer stops before step 1 -------------------------------------------------------
def _train(argv, logs: Path, name: str):
    return train(["--model", "AlignCLIP-Tiny", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup",
                  "1", "--seed", "0", "--log-every-n-steps", "1", "--epochs", "1", *argv], logs, name, check=False,
                 timeout=300)


def test_trainer_refuses_bad_shards_before_step_1_or_as_decoded(digits_csv, tmp_path):
    def edit(i, sample):
        if i == 5:
            del sample["emb.npy"]
    argv = ["--loss", "imsep", "--dataset-type", "webdataset", "--batch-size", "16", "--semantic-source", "precomputed"]
    pattern = write_shards(tmp_path / "missing", digits_csv, [range(0, 24), range(24, 48)], edit=edit)
    out = _train([*argv, "--train-data", pattern], tmp_path / "logs", "unrecorded")       # at that sample
    assert out.returncode != 0 and not list((tmp_path / "logs").rglob("*.pt"))
    errors = error_lines(out)
    assert len(errors) == 1 and "shard-000000.tar: no embedding column" in errors[0], out.stderr[-2000:]
    record_shards(tmp_path / "missing")
    out = _train([*argv, "--train-data", pattern], tmp_path / "logs", "recorded")          # before step 1
    assert out.returncode != 0 and "Train Epoch" not in out.stdout + out.stderr
    assert "shard-000000.tar has no embedding column" in out.stderr and "KEY.emb.npy in only 23 of its 24" in out.stderr

    small = write_shards(tmp_path / "small", digits_csv, [range(0, 29)])       # 29 samples, batch 32: no hang
    out = _train(["--train-data", small, "--dataset-type", "webdataset", "--batch-size", "32"], tmp_path / "logs", "small")
    assert out.returncode != 0 and "fewer than one batch of 32" in out.stderr
    assert not list((tmp_path / "logs").rglob("*.pt"))


def test_clip_run_opens_no_shard_before_step_1(digits_csv, tmp_path, monkeypatch):
    """--loss clip reads nothing of the training data before step 1: no tar is opened until upstream's
    train_one_epoch starts the epoch (it calls DataInfo.set_epoch first), by anything in the process."""
    pattern = write_shards(tmp_path / "shards", digits_csv, [range(0, 24), range(24, 48)])
    opened, started = [], []
    real_open, real_tar_open = builtins.open, tarfile.open

    def watch(name):
        if str(name).endswith(".tar"):
            opened.append((str(name), bool(started)))

    def counting_open(file, *args, **kwargs):
        watch(file)
        return real_open(file, *args, **kwargs)

    def counting_tar_open(name=None, *args, **kwargs):
        watch(name if name is not None else getattr(kwargs.get("fileobj"), "name", ""))
        return real_tar_open(name, *args, **kwargs)

    set_epoch = oc_data.DataInfo.set_epoch
    monkeypatch.setattr(oc_data.DataInfo, "set_epoch", lambda self, epoch: (started.append(epoch), set_epoch(self, epoch)))
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(tarfile, "open", counting_tar_open)
    train_here(["--model", "AlignCLIP-Tiny", "--train-data", pattern, "--dataset-type", "webdataset", "--batch-size",
                "16", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--epochs", "1",
                "--lr", "1e-4"], tmp_path / "logs", "clip")
    assert started and opened, "the run trained on the shards"
    assert [name for name, after in opened if not after] == []
    assert (tmp_path / "logs" / "clip" / "checkpoints" / "epoch_1.pt").exists()


def test_trainer_refuses_an_empty_csv_caption_instead_of_training_on_nan(digits_csv, tmp_path):
    rows = pd.read_csv(digits_csv, sep="\t")
    rows.loc[10, "title"] = None
    csv = tmp_path / "train.csv"
    rows.to_csv(csv, sep="\t", index=False)
    out = _train(["--train-data", str(csv), "--dataset-type", "csv", "--batch-size", "16"], tmp_path / "logs", "nan")
    assert out.returncode != 0 and "row 10 (line 12)" in out.stderr and "Train Epoch" not in out.stdout + out.stderr


def test_sogclr_on_shards_without_sizes_json_counts_the_shards(digits_csv, tmp_path):
    """SogCLR sizes its per-sample state by what the shards hold (their record) when there is no sizes.json."""
    import torch

    pattern = write_shards(tmp_path, digits_csv, [range(0, 16), range(16, 32)], sizes=False)
    record_shards(tmp_path)               # `openclip-align data check`: the record counts the samples
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
    np.save(tmp_path / "train.emb.npy", unit_vectors(48, width))
    if meta_dim:
        (tmp_path / "train.emb.json").write_text(json.dumps({"model": "all-MiniLM-L6-v2", "dim": meta_dim, "n": 48}))
    with batch_extras.requesting({"semantic", "caption"}, semantic_precomputed=True, semantic_on_the_fly=False):
        with pytest.raises(MissingExtrasError, match=match):
            _csv_dataset(csv)
    np.save(tmp_path / "train.emb.npy", unit_vectors(48, 384))           # the right file passes
    with batch_extras.requesting({"semantic", "caption"}, semantic_precomputed=True, semantic_on_the_fly=False):
        assert _csv_dataset(csv)[0][2]["semantic"].shape == (384,)


# --- once per run, not once per rank ------------------------------------------------------------------
def _once_per_run_worker(rank, world, folder, fail):
    out = Path(folder)

    def check():
        (out / f"checked-by-rank{rank}").write_text("")
        if fail:
            raise CorpusError("shard s-000003.tar sample 000000017: broken; rerun `openclip-align data check`")
        return {"samples": 48}

    try:
        result = training_shards.once_per_run(SimpleNamespace(distributed=True), check)
        (out / f"result{rank}").write_text(json.dumps(result))
    except CorpusError as err:
        (out / f"error{rank}").write_text(str(err))


@pytest.mark.parametrize("fail", [False, True])
def test_the_record_is_checked_on_rank_0_and_every_rank_gets_its_outcome(tmp_path, fail):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _dist import spawn

    spawn(_once_per_run_worker, 2, str(tmp_path), fail, timeout=120)
    assert sorted(p.name for p in tmp_path.glob("checked-by-*")) == ["checked-by-rank0"]
    if fail:       # the same one-line error on every rank, no rank left waiting
        messages = {(tmp_path / f"error{r}").read_text() for r in range(2)}
        assert messages == {"shard s-000003.tar sample 000000017: broken; rerun `openclip-align data check`"}
    else:
        assert {(tmp_path / f"result{r}").read_text() for r in range(2)} == {json.dumps({"samples": 48})}


def test_two_sources_numbered_from_0_are_refused_when_recorded_and_named_when_not(digits_csv, tmp_path, caplog):
    """A '::' mixture of two exports each numbered 0..15: a loss keeping per-sample state would give pair i of
    both sources one slot. With records the overlap stops the run; without, the log says it is not checked."""
    a = write_shards(tmp_path / "A", digits_csv, [range(0, 16)])
    b = write_shards(tmp_path / "B", digits_csv, [range(0, 16)])
    args = shard_args(f"{a}::{b}", loss="sogclr")
    with caplog.at_level(logging.WARNING):
        plan_shards(args, semantic=False, index=True)
    assert "--train-data has 2 '::' sources and 2 of 2 shards have no record" in caplog.text
    assert "checked against [0, 32) as samples are decoded, but not against the other sources'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_shards(shard_args(a, loss="sogclr"), semantic=False, index=True)     # one source: nothing to say
    assert "'::' sources" not in caplog.text
    record_shards(tmp_path / "A")
    record_shards(tmp_path / "B")
    with pytest.raises(CorpusError, match=r"the indices of shard .*A/shard-000000.tar \(0..15\) and shard "
                                          r".*B/shard-000000.tar \(0..15\) overlap"):
        plan_shards(args, semantic=False, index=True)
