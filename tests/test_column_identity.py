"""A column row belongs to the caption it embeds, not to a file name (issue 29 items 2 and 3).

Two hand-made img2dataset-style exports A and B hold the same shard name (``00000.tar``), the same keys
and images, and captions of the same length ("A caption 3" / "B caption 3"): only the captions tell them
apart, so the shards even have the same size. Expected embeddings are hand-made vectors chosen per
caption, so the expectation never goes through the join under test."""
import base64
import json
import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import open_clip_train.data as oc_data
from _shard_fixtures import shard_args
from _trainer_launch import error_lines, train
from openclip_align.cli import main
from openclip_align.data.column import has_fingerprints, write_column
from openclip_align.data.record import RECORD_FORMAT, RECORD_NAME, recorded_entries, scan_shard, write_record
from openclip_align.data import shards as sh
from openclip_align.data.check_shards import check_shards
from openclip_align.data.embed import add_fingerprints, embed_shards
from openclip_align.integration import training_shards
from openclip_align.data.errors import CorpusError, TrainingDataError

N, WIDTH = 16, 384
KEYS = [f"{i:09d}" for i in range(N)]


def _caption(source: str, i: int) -> str:
    return f"{source} caption {i:02d}"


def _vector(source: str, i: int) -> np.ndarray:
    """A known unit vector per caption: A's rows and B's rows are far apart."""
    v = np.zeros(WIDTH, np.float32)
    v[(0 if source == "A" else WIDTH // 2) + i] = 1.0
    return v


def _export(root: Path, source: str) -> str:
    """``root/source/00000.tar``: N samples (png + txt), keys numbered from 000000000 as img2dataset does."""
    from PIL import Image

    folder = root / source
    folder.mkdir(parents=True)
    png = sh.png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    path = folder / "00000.tar"
    sh.write_tar(path, [(k, [("png", png), ("txt", _caption(source, i).encode())]) for i, k in enumerate(KEYS)])
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": N}))
    return str(path)


def _embed_by_hand(shard: str, source: str, out, fingerprints: bool = True) -> None:
    """What `embed` writes, with the known vectors (and, unless a legacy column, the captions' fingerprints)."""
    write_column(shard, out, KEYS, np.stack([_vector(source, i) for i in range(N)]), model="all-MiniLM-L6-v2",
                 index_start=0, captions=[_caption(source, i) for i in range(N)] if fingerprints else None)


@pytest.fixture
def exports(tmp_path):
    a, b = _export(tmp_path, "A"), _export(tmp_path, "B")
    assert os.path.getsize(a) == os.path.getsize(b)                  # only the captions differ
    return tmp_path, a, b


def _args(train_data, **kw):
    return shard_args(train_data, **{"batch_size": 4, **kw})


def _decoded(urls, args):
    """(url, key, caption, embedding) of every sample as upstream's webdataset stages decode them, in shard
    order; stops where the check raises (the samples before it are in ``seen``)."""
    needs = {"semantic", "caption"}
    plan = training_shards.plan_training_shards(args, needs, oc_data.expand_urls, oc_data.get_dataset_size)
    extras = training_shards.ShardSampleExtras(plan, needs, args.semantic_source)
    stream = wds.DataPipeline(wds.SimpleShardList(urls), oc_data.tarfile_to_samples_nothrow, wds.decode("pilrgb"),
                              wds.map(lambda s: (s["__url__"], s["__key__"], s["txt"], extras(s)["semantic"])))
    seen = []
    try:
        for row in stream:
            seen.append(row)
    except CorpusError as err:
        return seen, err
    return seen, None


# --- item 2: one column folder for two sources ------------------------------------------------------------
@pytest.mark.parametrize("how", ["local", "pipe"])
def test_same_named_shards_from_two_sources_with_one_column_folder_stop_at_bs_first_sample(exports, how):
    root, a, b = exports
    _embed_by_hand(a, "A", str(root / "columns"))
    urls = [a, b] if how == "local" else [f"pipe:cat {a}", f"pipe:cat {b}"]
    seen, err = _decoded(urls, _args("::".join(urls), semantic_embeddings=str(root / "columns")))
    assert [(u, k) for u, k, _, _ in seen] == [(urls[0], k) for k in KEYS]            # no sample of B got through
    for _, _, caption, emb in seen:                                                    # A's own rows
        np.testing.assert_allclose(emb.numpy(), _vector("A", int(caption.split()[-1])), atol=1e-3)
    assert err is not None
    message = str(err)
    assert f"shard {urls[1]} sample 000000000" in message
    assert "'B caption 00' is not the caption row 0" in message and f"made from {a}" in message
    assert "--semantic-embeddings DIR_A::DIR_B" in message


def test_recorded_sources_with_one_column_folder_stop_before_step_1(exports):
    root, a, b = exports
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns))
    for shard in (a, b):
        check_shards(shard, progress=False)                    # each export's record beside its shards
    assert training_shards.plan_training_shards(_args(a, semantic_embeddings=str(columns)),
                                                {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size).width == WIDTH
    with pytest.raises(CorpusError, match=rf"shard {b}: its column {columns}/00000.emb.json was made from other "
                                          rf"captions \(same keys.*made from {a}"):
        training_shards.plan_training_shards(_args(f"{a}::{b}", semantic_embeddings=str(columns)), {"semantic"},
                                             oc_data.expand_urls, oc_data.get_dataset_size)


def test_a_record_in_the_column_folder_is_not_taken_for_another_sources_shard(exports):
    """embed --out COL records A's shard in COL by its relative path; B's same-named shard is not it."""
    root, a, b = exports
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns))
    write_record(str(columns), {a: scan_shard(a, column_dir=str(columns))})
    assert recorded_entries([a], str(columns))[a]["path"] == "../A/00000.tar"
    assert recorded_entries([b], str(columns)) == {}
    seen, err = _decoded([b], _args(b, semantic_embeddings=str(columns)))
    assert seen == [] and "shard " + b + " sample 000000000: its caption 'B caption 00'" in str(err)


def test_an_old_by_name_record_entry_is_not_called_a_changed_shard(exports):
    """A record written before entries had paths, in the column folder, names A's shard only by its name:
    B's shard of that name (another size) is not said to have "changed since it was checked"."""
    from PIL import Image

    root, a, _ = exports
    other = root / "C" / "00000.tar"
    other.parent.mkdir()
    png = sh.png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    keys = [f"{i:09d}" for i in range(N + 40)]                                     # a larger export
    sh.write_tar(other, [(k, [("png", png), ("txt", _caption("C", i).encode())]) for i, k in enumerate(keys)])
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns))
    record = {"format": RECORD_FORMAT, "shards": {"00000.tar": scan_shard(a, column_dir=str(columns))}}
    (columns / RECORD_NAME).write_text(json.dumps(record))                  # no "path": found by name
    with pytest.raises(CorpusError) as info:
        training_shards.plan_training_shards(_args(str(other), semantic_embeddings=str(columns)), {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size)
    message = str(info.value)
    assert f"shard {other} has {os.path.getsize(other)} bytes, but {columns}/{RECORD_NAME} holds an entry of " \
           f"{os.path.getsize(a)} bytes for a shard of that name, found by name only" in message
    assert "changed since it was checked" not in message


def test_semantic_embeddings_a_b_pairs_column_folders_with_the_sources(exports):
    root, a, b = exports
    _embed_by_hand(a, "A", str(root / "colA"))
    _embed_by_hand(b, "B", str(root / "colB"))
    for urls in ([a, b], [f"pipe:cat {a}", f"pipe:cat {b}"]):
        seen, err = _decoded(urls, _args("::".join(urls), semantic_embeddings=f"{root / 'colA'}::{root / 'colB'}"))
        assert err is None and len(seen) == 2 * N
        for url, _, caption, emb in seen:
            source, i = caption.split()[0], int(caption.split()[-1])
            assert url == urls[0 if source == "A" else 1]
            np.testing.assert_allclose(emb.numpy(), _vector(source, i), atol=1e-3)
    # the folders in the other order: A's samples meet B's column at their first sample
    seen, err = _decoded([a, b], _args(f"{a}::{b}", semantic_embeddings=f"{root / 'colB'}::{root / 'colA'}"))
    assert seen == [] and f"shard {a} sample 000000000: its caption 'A caption 00'" in str(err)
    with pytest.raises(TrainingDataError, match=r"names 3 column folders but --train-data has 2 '::' sources"):
        training_shards.plan_training_shards(
            _args(f"{a}::{b}", semantic_embeddings=f"{root / 'colA'}::{root / 'colB'}::{root / 'colA'}"),
            {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size)
    with pytest.raises(TrainingDataError, match=r"--semantic-embeddings: .*nowhere \(for --train-data source .*B"):
        training_shards.plan_training_shards(_args(f"{a}::{b}", semantic_embeddings=f"{root / 'colA'}::{root}/nowhere"),
                                             {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size)


def test_semantic_dir_runs_inside_the_once_per_run_check(exports, monkeypatch):
    """Only rank 0 looks at the folder: the others receive its outcome (no rank decides alone)."""
    root, a, _ = exports
    ran = []
    monkeypatch.setattr(training_shards, "once_per_run", lambda args, check: ran.append("once") or check())
    real = training_shards.semantic_dirs
    monkeypatch.setattr(training_shards, "semantic_dirs", lambda *x: ran.append("dirs") or real(*x))
    with pytest.raises(TrainingDataError, match="no such directory"):
        training_shards.plan_training_shards(_args(f"pipe:cat {a}", semantic_embeddings=str(root / "nowhere")),
                                             {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size)
    assert ran == ["once", "dirs"]


# --- embed --out ------------------------------------------------------------------------------------------
def test_embed_out_refuses_to_overwrite_another_sources_column(exports, capsys, monkeypatch):
    root, a, b = exports
    shared = root / "shared"
    _embed_by_hand(a, "A", str(shared))
    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    monkeypatch.setattr("openclip_align.data.semantic.load_sentence_encoder",
                        lambda *x, **k: pytest.fail("the encoder was loaded before the refusal"))
    assert main(["embed", "--model", "all-MiniLM-L6-v2", "--data", str(root / "B"), "--out", str(shared),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"already holds {shared}/00000.emb.json, the column of {a}, not of {b}: their captions differ" in err
    assert "pass another --out" in err
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before          # A's column untouched
    with pytest.raises(CorpusError, match=r"two shards named 00000.tar"):
        embed_shards(str(root / "{A,B}" / "00000.tar"), str(root / "fresh"), progress=False)


def test_embed_fingerprints_its_rows(exports, tmp_path):
    from openclip_align.data import semantic

    root, a, _ = exports
    try:
        semantic.load_sentence_encoder("all-MiniLM-L6-v2")
    except Exception as err:                        # the fast encoder package is a dev dependency
        pytest.skip(f"all-MiniLM-L6-v2 not installed: {err}")
    embed_shards(str(root / "A"), str(root / "col"), model="all-MiniLM-L6-v2", progress=False)
    meta = json.loads((root / "col" / "00000.emb.json").read_text())
    import hashlib

    raw = base64.b64decode(meta["caption_fingerprints"])
    assert [raw[8 * i:8 * i + 8] for i in range(N)] == [hashlib.blake2b(_caption("A", i).encode(), digest_size=8).digest()
                                                         for i in range(N)]
    assert meta["shard_path"] == "../A/00000.tar" and meta["shard_count"] == N


# --- legacy columns ---------------------------------------------------------------------------------------
def test_a_legacy_column_trains_with_one_warning_and_add_fingerprints_fixes_it(exports, caplog, capsys):
    root, a, b = exports
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns), fingerprints=False)
    npy = (columns / "00000.emb.npy").read_bytes()
    with caplog.at_level(logging.WARNING):
        seen, err = _decoded([a], _args(a, semantic_embeddings=str(columns)))
    assert err is None and len(seen) == N
    warnings = [r.getMessage() for r in caplog.records if "no caption fingerprints" in r.getMessage()]
    assert len(warnings) == 1 and "openclip-align embed --data SHARDS [--out COLDIR] --add-fingerprints" in warnings[0]
    # a legacy column cannot tell B's samples from A's: that is what the fingerprints add
    assert _decoded([b], _args(b, semantic_embeddings=str(columns)))[1] is None
    # A's shard still has the size and keys the column records: it vouches, and gives A's captions' fingerprints
    assert main(["embed", "--data", str(root / "A"), "--out", str(columns), "--add-fingerprints"]) == 0
    assert "caption fingerprints added to 1 columns (16 rows)" in capsys.readouterr().out
    assert (columns / "00000.emb.npy").read_bytes() == npy                     # the array is not rewritten
    seen, err = _decoded([b], _args(b, semantic_embeddings=str(columns)))
    assert seen == [] and "'B caption 00' is not the caption row 0" in str(err)
    assert _decoded([a], _args(a, semantic_embeddings=str(columns)))[1] is None


def test_an_embed_rerun_fingerprints_a_legacy_column_without_embedding_again(exports, monkeypatch):
    root, a, b = exports
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns), fingerprints=False)
    npy = (columns / "00000.emb.npy").read_bytes()
    monkeypatch.setattr("openclip_align.data.semantic.load_sentence_encoder",
                        lambda *x, **k: pytest.fail("a current column was embedded again"))
    embed_shards(str(root / "A"), str(columns), model="all-MiniLM-L6-v2", progress=False)
    assert (columns / "00000.emb.npy").read_bytes() == npy
    assert has_fingerprints(json.loads((columns / "00000.emb.json").read_text()))
    seen, err = _decoded([b], _args(b, semantic_embeddings=str(columns)))
    assert seen == [] and "'B caption 00' is not the caption row 0" in str(err)


def test_add_fingerprints_refuses_a_column_its_shard_does_not_match(exports):
    root, a, _ = exports
    columns = root / "columns"
    _embed_by_hand(a, "A", str(columns), fingerprints=False)
    sh.write_tar(a, [(k, [("txt", b"x")]) for k in KEYS[:3]])                   # A rewritten since
    with pytest.raises(CorpusError, match=r"cannot vouch that .*00000.emb.json was made from it \(its size .* and "
                                          r"keys differ\); re-embed it"):
        add_fingerprints(a, str(columns))


# --- item 3: a copied corpus is checked against its own columns --------------------------------------------
def _built(root: Path) -> Path:
    """A corpus as `embed` + `data check` leave it: two shards, their columns and the record beside them."""
    corpus_dir = root / "corpus"
    from PIL import Image

    corpus_dir.mkdir()
    png = sh.png_bytes(Image.new("RGB", (16, 16), (0, 90, 0)))
    for s in range(2):
        keys = [f"{s}{i:08d}" for i in range(8)]
        path = corpus_dir / f"shard-{s:06d}.tar"
        sh.write_tar(path, [(k, [("png", png), ("txt", f"pair {s} {i}".encode())]) for i, k in enumerate(keys)])
        write_column(str(path), None, keys, np.stack([_vector("A", 8 * s + i) for i in range(8)]),
                     model="all-MiniLM-L6-v2", index_start=8 * s, captions=[f"pair {s} {i}" for i in range(8)])
    (corpus_dir / "sizes.json").write_text(json.dumps({"shard-000000.tar": 8, "shard-000001.tar": 8}))
    check_shards(str(corpus_dir), progress=False)
    return corpus_dir


@pytest.mark.parametrize("cp_flag", ["-a", "-r"])
def test_a_copied_corpus_is_checked_against_its_own_columns(tmp_path, cp_flag, monkeypatch):
    original = _built(tmp_path)
    record = json.loads((original / RECORD_NAME).read_text())
    assert {e["column"]["dir"] for e in record["shards"].values()} == {"."}          # relative to the record
    copy = tmp_path / "copy"
    subprocess.run(["cp", cp_flag, str(original), str(copy)], check=True)
    pattern = str(copy / "shard-{000000..000001}.tar")
    if cp_flag == "-a":                       # same times: a stat per file, no shard opened
        monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a shard was opened"))
    plan = training_shards.plan_training_shards(_args(pattern), {"semantic", "index"}, oc_data.expand_urls, oc_data.get_dataset_size)
    assert plan.width == WIDTH and not plan.unrecorded and plan.total == 16
    assert plan.check.rehashed == ([] if cp_flag == "-a" else [str(copy / "shard-000000.tar"),
                                                                str(copy / "shard-000001.tar")])
    monkeypatch.undo()
    os.unlink(copy / "shard-000001.emb.npy")
    os.unlink(copy / "shard-000001.emb.json")
    with pytest.raises(CorpusError, match=rf"shard {copy}/shard-000001.tar: its column {copy}/shard-000001.emb.json, "
                                          rf"listed in {copy}/{RECORD_NAME}, is missing"):
        training_shards.plan_training_shards(_args(pattern), {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size)
    # the original is untouched and still checks
    original_pattern = str(original / "shard-{000000..000001}.tar")
    assert training_shards.plan_training_shards(_args(original_pattern), {"semantic"}, oc_data.expand_urls, oc_data.get_dataset_size).width == WIDTH


def test_an_old_record_with_absolute_column_dirs_still_works(tmp_path):
    original = _built(tmp_path)
    path = original / RECORD_NAME
    record = json.loads(path.read_text())
    for entry in record["shards"].values():
        entry["column"]["dir"] = str(original)
        entry.pop("path", None)
    path.write_text(json.dumps(record))
    plan = training_shards.plan_training_shards(_args(str(original / "shard-{000000..000001}.tar")), {"semantic"},
                                                oc_data.expand_urls, oc_data.get_dataset_size)
    assert plan.width == WIDTH and not plan.unrecorded


# --- end to end: the trainer with pipe: urls ----------------------------------------------------------------
def test_trainer_stops_at_bs_first_sample_with_pipe_urls_and_one_column_folder(exports):
    root, a, b = exports
    _embed_by_hand(a, "A", str(root / "columns"))
    out = train(["--model", "AlignCLIP-Tiny", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup",
                 "1", "--seed", "0", "--epochs", "1", "--loss", "imsep", "--dataset-type", "webdataset", "--batch-size",
                 "8", "--semantic-source", "precomputed", "--train-data", f"pipe:cat {b}::pipe:cat {a}",
                 "--train-num-samples", str(2 * N), "--semantic-embeddings", str(root / "columns")],
                root / "logs", "mixed", check=False, timeout=300)
    assert out.returncode != 0, out.stderr[-2000:]
    errors = error_lines(out)
    assert len(errors) == 1, out.stderr[-3000:]
    assert f"shard pipe:cat {b} sample" in errors[0] and "is not the caption row" in errors[0]
    assert not list((root / "logs").rglob("*.pt"))
