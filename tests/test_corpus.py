"""The corpus module: columns beside shards, the record, and its O(shards) verification.

Shards are made here by hand with tarfile; expectations are computed independently (hashlib for the
keys hash, hand-counted samples and index ranges)."""
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from openclip_align.data.column import ColumnReader, check_vector, column_paths, write_column
from openclip_align.data.errors import CorpusError
from openclip_align.data.preflight import verify_record
from openclip_align.data.record import RECORD_FORMAT, read_record, scan_shard, write_record
from openclip_align.data.shard_files import shard_name


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def make_shard(path, samples):
    """samples: [(key, {suffix: bytes})]; members in the given order, an image member first."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def plain_samples(keys, first_index=None, captions=None, emb=None):
    out = []
    for i, key in enumerate(keys):
        members = {"jpg": b"\xff\xd8" + bytes(300), "txt": (captions[i] if captions else f"caption {key}").encode()}
        if first_index is not None:
            members["json"] = json.dumps({"index": first_index + i}).encode()
        if emb is not None:
            members["emb.npy"] = _npy(emb[i])
        out.append((key, members))
    return out


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_column_paths_beside_the_shard_and_in_a_directory():
    assert column_paths("/d/s/train-000003.tar", None) == ("/d/s/train-000003.emb.npy", "/d/s/train-000003.emb.json")
    assert column_paths("/d/s/x.tar", "/cols") == ("/cols/x.emb.npy", "/cols/x.emb.json")
    assert shard_name("pipe:aws s3 cp s3://b/cc12m/00012.tar -") == "00012.tar"


def test_scan_shard_counts_hashes_and_index_range(tmp_path):
    keys = ["000000", "000001", "000002", "000003"]
    samples = plain_samples(keys, first_index=10, captions=["a", "  ", "c", "d"])
    del samples[3][1]["txt"]                                  # no caption member at all
    path = make_shard(tmp_path / "s.tar", samples)
    entry = scan_shard(path, want_index=True)
    assert entry["count"] == 4
    assert entry["keys_sha256"] == hashlib.sha256("000000\n000001\n000002\n000003".encode()).hexdigest()
    assert (entry["index_min"], entry["index_max"], entry["index_count"]) == (10, 13, 4)
    assert entry["indices_unique"] is True
    assert entry["empty_caption_keys"] == ["000001", "000003"]
    assert entry["has_emb_member"] is False and entry["column"] is None
    st = os.stat(path)
    assert (entry["bytes"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns)


def test_scan_shard_never_reads_image_members(tmp_path, monkeypatch):
    path = make_shard(tmp_path / "s.tar", plain_samples(["a0", "a1"]))
    read = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    scan_shard(path)
    assert sorted(read) == ["a0.txt", "a1.txt"]


def test_scan_shard_finds_duplicate_indices_and_bad_members(tmp_path):
    emb = unit_rows(3, 4)
    emb[2, 1] = np.nan
    samples = plain_samples(["k0", "k1", "k2"], first_index=0, emb=emb)
    samples[1][1]["json"] = b'{"index": 0}'
    entry = scan_shard(make_shard(tmp_path / "s.tar", samples))
    assert entry["indices_unique"] is False
    assert entry["emb_member_count"] == 3 and entry["emb_member_width"] == 4
    assert entry["emb_member_finite"] is False
    assert "sample k2" in entry["problems"][0] and "non-finite" in entry["problems"][0]


def test_truncated_shard_is_named(tmp_path):
    path = make_shard(tmp_path / "s.tar", plain_samples([f"k{i}" for i in range(5)]))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:1700])
    with pytest.raises(CorpusError, match=r"s\.tar cannot be read to its end"):
        scan_shard(path)


def _column_for(shard, coldir, rows, keys, **kw):
    return write_column(shard, coldir, keys, rows, model="all-MiniLM-L6-v2", **kw)


def test_column_round_trip_in_float16_and_pickled_reader(tmp_path):
    keys = ["k0", "k1", "k2"]
    shard = make_shard(tmp_path / "s.tar", plain_samples(keys))
    rows = unit_rows(3, 384)
    meta = _column_for(shard, None, rows, keys, index_start=100)
    npy, js = column_paths(shard, None)
    assert np.load(npy).dtype == np.float16
    assert json.load(open(js))["keys"] == keys and meta["count"] == 3
    # 2 bytes per value plus the npy header: within the 2*d + 64 budget per sample
    assert os.path.getsize(npy) <= 3 * 2 * 384 + 128
    reader = pickle.loads(pickle.dumps(ColumnReader(expected_width=384)))
    got = reader.lookup(shard, "k1")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, rows[1], atol=1e-3)
    assert reader.index(shard, "k2") == 102
    assert pickle.loads(pickle.dumps(reader))._open == {}      # open memory maps never travel


def test_reader_keeps_a_few_shards_open(tmp_path):
    reader = ColumnReader(cache_size=2)
    shards = []
    for i in range(3):
        shard = make_shard(tmp_path / f"s{i}.tar", plain_samples([f"k{i}"]))
        _column_for(shard, None, unit_rows(1, 8, seed=i), [f"k{i}"])
        shards.append(shard)
        reader.lookup(shard, f"k{i}")
    assert list(reader._open) == shards[1:]


def test_reader_refuses_missing_foreign_short_wide_and_nan_columns(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"]))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0", "b1"]))
    with pytest.raises(CorpusError, match=r"a\.tar: no embedding column .*openclip-align embed"):
        ColumnReader().lookup(a, "a0")
    # b's column copied under a's name: another shard's keys
    _column_for(b, None, unit_rows(2, 8), ["b0", "b1"])
    for suffix in (".emb.npy", ".emb.json"):
        os.replace(str(tmp_path / "b") + suffix, str(tmp_path / "a") + suffix)
    with pytest.raises(CorpusError, match=r"is the column of shard b\.tar, not of a\.tar"):
        ColumnReader().lookup(a, "a0")
    # a missing row
    _column_for(a, None, unit_rows(1, 8), ["a0"], shard_keys=["a0", "a1"])
    with pytest.raises(CorpusError, match=r"a\.tar sample a1 has no row"):
        ColumnReader().lookup(a, "a1")
    # the wrong width
    _column_for(a, None, unit_rows(2, 8), ["a0", "a1"])
    with pytest.raises(CorpusError, match=r"a\.tar.*width 8, expected 384"):
        ColumnReader(expected_width=384).lookup(a, "a0")
    # a NaN row
    rows = unit_rows(2, 8)
    rows[1, 3] = np.nan
    _column_for(a, None, rows, ["a0", "a1"], dtype="float32")
    reader = ColumnReader()
    np.testing.assert_allclose(reader.lookup(a, "a0"), rows[0])
    with pytest.raises(CorpusError, match=r"a\.tar sample a1: row 1 .*non-finite"):
        reader.lookup(a, "a1")


def test_a_column_without_its_json_is_incomplete(tmp_path):
    shard = make_shard(tmp_path / "s.tar", plain_samples(["k0"]))
    _column_for(shard, None, unit_rows(1, 8), ["k0"])
    os.unlink(column_paths(shard, None)[1])
    with pytest.raises(CorpusError, match="incomplete"):
        ColumnReader().lookup(shard, "k0")


def test_a_shard_changed_after_embedding_is_noticed_by_the_reader(tmp_path):
    shard = make_shard(tmp_path / "s.tar", plain_samples(["k0", "k1"]))
    _column_for(shard, None, unit_rows(2, 8), ["k0", "k1"])
    make_shard(tmp_path / "s.tar", plain_samples([f"k{i}" for i in range(40)]))     # past tar's 10 KiB padding
    with pytest.raises(CorpusError, match="the shard changed since"):
        ColumnReader().lookup(shard, "k0")


def _recorded(tmp_path, shards):
    write_record(str(tmp_path), {os.path.basename(s): scan_shard(s) for s in shards})
    return read_record(str(tmp_path))


def test_record_round_trip_merges_entries(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0"]))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0", "b1"]))
    write_record(str(tmp_path), {"a.tar": scan_shard(a)})
    write_record(str(tmp_path), {"b.tar": scan_shard(b)})
    record = read_record(str(tmp_path))
    assert record["format"] == RECORD_FORMAT
    assert {k: v["count"] for k, v in record["shards"].items()} == {"a.tar": 1, "b.tar": 2}
    assert read_record(str(tmp_path / "nowhere")) is None


def test_verify_record_detects_a_changed_shard_by_size_and_keys_not_by_mtime(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"]))
    _recorded(tmp_path, [a])
    assert verify_record([a]).counts == {a: 2}
    os.utime(a, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns + 10**9))    # same bytes, new time (cp -r)
    check = verify_record([a])
    assert check.counts == {a: 2} and check.rehashed == [a]
    size = os.path.getsize(a)
    make_shard(a, plain_samples(["a0", "b1"]))                 # same size, other keys: rewritten
    assert os.path.getsize(a) == size
    with pytest.raises(CorpusError, match=r"a\.tar has the size .* records but other keys .*data check"):
        verify_record([a])
    make_shard(a, plain_samples(["a0", "a1", "a2"] + [f"x{i}" for i in range(30)]))     # another size
    with pytest.raises(CorpusError, match=r"a\.tar changed since it was checked: it has \d+ bytes, .*record.* "
                                            r"recorded \d+; .*data check"):
        verify_record([a])


def test_verify_record_reads_no_shard(tmp_path, monkeypatch):
    shards = [make_shard(tmp_path / f"s{i}.tar", plain_samples([f"s{i}k{j}" for j in range(3)], first_index=3 * i))
              for i in range(3)]
    _recorded(tmp_path, shards)
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("verify_record opened a shard"))
    check = verify_record(shards, needs_index=True, batch_size=3, workers=1)
    assert check.samples == 9 and not check.unrecorded and set(check.index_from.values()) == {"json"}


def test_verify_record_empty_captions_refused_or_dropped(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1", "a2"], captions=["x", "", "y"]))
    _recorded(tmp_path, [a])
    with pytest.raises(CorpusError, match=r"1 of 3 .*a\.tar sample a1.*--drop-empty-captions"):
        verify_record([a])
    check = verify_record([a], drop_empty_captions=True)
    assert check.dropped == {(a, "a1")} and check.kept(a) == 2


def test_verify_record_index_ranges_must_be_disjoint_and_in_range(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"], first_index=0))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0", "b1"], first_index=1))      # 1..2 overlaps 0..1
    _recorded(tmp_path, [a, b])
    with pytest.raises(CorpusError, match=r"a\.tar \(0\.\.1\) and .*b\.tar \(1\.\.2\) overlap"):
        verify_record([a, b], needs_index=True)
    c = make_shard(tmp_path / "c.tar", plain_samples(["c0", "c1"], first_index=5))      # 4 samples: 5 is outside
    _recorded(tmp_path, [c])
    with pytest.raises(CorpusError, match=r"c\.tar has index 6, outside \[0, 4\)"):
        verify_record([a, c], needs_index=True)
    d = make_shard(tmp_path / "d.tar", plain_samples(["d0"]))
    _recorded(tmp_path, [d])
    with pytest.raises(CorpusError, match=r"d\.tar has no KEY\.json \"index\""):
        verify_record([a, d], needs_index=True)


def test_verify_record_index_from_the_column(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"]))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0", "b1", "b2"]))
    _column_for(a, None, unit_rows(2, 384), ["a0", "a1"], index_start=0)
    _column_for(b, None, unit_rows(3, 384), ["b0", "b1", "b2"], index_start=2)
    _recorded(tmp_path, [a, b])
    check = verify_record([a, b], needs_index=True, needs_semantic=True, expected_width=384)
    assert check.index_from == {a: "column", b: "column"} and check.width == 384
    assert check.semantic_from == {a: "column", b: "column"}


def test_verify_record_column_problems(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"]))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0"]))
    _recorded(tmp_path, [a, b])
    with pytest.raises(CorpusError, match=r"precomputed: shard .*a\.tar has no embedding column"):
        verify_record([a, b], needs_semantic=True)
    assert verify_record([a, b], needs_semantic=True, semantic_source="auto").semantic_from == {a: "none", b: "none"}
    # columns written after the record: read from their json; a's has a missing row
    _column_for(a, None, unit_rows(1, 384), ["a0"], shard_keys=["a0", "a1"])
    _column_for(b, None, unit_rows(1, 384), ["b0"])
    with pytest.raises(CorpusError, match=r"a\.tar: its column has 1 rows .* 2 samples"):
        verify_record([a, b], needs_semantic=True)
    _column_for(a, None, unit_rows(2, 16), ["a0", "a1"])          # named MiniLM, but 16 wide
    with pytest.raises(CorpusError, match=r"a\.tar: embeddings of width 16, but .*all-MiniLM-L6-v2, whose .* 384"):
        verify_record([a, b], needs_semantic=True)
    write_column(a, None, ["a0", "a1"], unit_rows(2, 16), model="my/encoder")
    with pytest.raises(CorpusError, match=r"b\.tar: caption embeddings of width 384, the shards before it width 16"):
        verify_record([a, b], needs_semantic=True)
    _column_for(a, None, unit_rows(2, 384), ["a0", "a1"])
    with pytest.raises(CorpusError, match=r"width 384, but the run's encoder .* width 768"):
        verify_record([a, b], needs_semantic=True, expected_width=768)


def test_verify_record_members_of_todays_shards(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1"], emb=unit_rows(2, 384)))
    _recorded(tmp_path, [a])
    check = verify_record([a], needs_semantic=True, expected_width=384)
    assert check.semantic_from == {a: "member"} and check.width == 384


def test_verify_record_sizes_and_a_batch_per_worker(tmp_path):
    shards = [make_shard(tmp_path / f"s{i}.tar", plain_samples([f"s{i}k{j}" for j in range(4)])) for i in range(2)]
    _recorded(tmp_path, shards)
    with pytest.raises(CorpusError, match="deal a worker as few as 1 shard"):
        verify_record(shards, batch_size=5, workers=2)
    verify_record(shards, batch_size=4, workers=2)
    (tmp_path / "sizes.json").write_text(json.dumps({"s0.tar": 4, "s1.tar": 6}))
    with pytest.raises(CorpusError, match=r"says .*s1\.tar holds 6 samples, but it holds 4"):
        verify_record(shards)
    verify_record(shards, train_num_samples=8)          # upstream then does not read sizes.json


def test_unrecorded_shards_are_returned_for_per_sample_checks(tmp_path):
    a = make_shard(tmp_path / "a.tar", plain_samples(["a0"]))
    b = make_shard(tmp_path / "b.tar", plain_samples(["b0"]))
    _recorded(tmp_path, [a])
    check = verify_record([a, b], needs_index=True, batch_size=64)      # shard-set checks wait for b
    assert check.unrecorded == [b] and list(check.recorded) == [a]


def test_check_vector_names_the_sample():
    with pytest.raises(CorpusError, match="s.tar sample k: .*non-finite"):
        check_vector("s.tar sample k", _npy(np.array([np.inf, 0.0], np.float32)), None)
    with pytest.raises(CorpusError, match="width 3, expected 2"):
        check_vector("w", np.zeros(3, np.float32), 2)
    assert check_vector("w", _npy(np.zeros(5, np.float16)), None) == 5


def test_data_check_records_in_parallel_and_resumes(tmp_path, monkeypatch, capsys):
    from openclip_align.cli import main

    shards = [make_shard(tmp_path / f"s-{i:03d}.tar", plain_samples([f"{i}x{j}" for j in range(3)], first_index=3 * i))
              for i in range(3)]
    assert main(["data", "check", "--data", str(tmp_path), "--workers", "2", "--no-progress"]) == 0
    assert "3 shards, 9 samples" in capsys.readouterr().out
    record = read_record(str(tmp_path))
    assert {k: (v["count"], v["index_min"], v["index_max"]) for k, v in record["shards"].items()} == \
        {"s-000.tar": (3, 0, 2), "s-001.tar": (3, 3, 5), "s-002.tar": (3, 6, 8)}
    verify_record(shards, needs_index=True)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"s-000.tar": 3, "s-001.tar": 3, "s-002.tar": 3}
    # a rerun reads only the shard that changed
    scanned = []
    real = scan_shard
    monkeypatch.setattr("openclip_align.data.record.scan_shard",
                        lambda path, **kw: scanned.append(os.path.basename(path)) or real(path, **kw))
    make_shard(tmp_path / "s-001.tar", plain_samples(["1x0", "1x1"], captions=["ok", ""], first_index=3))
    assert main(["data", "check", "--data", str(tmp_path), "--workers", "1", "--no-progress"]) == 1
    assert scanned == ["s-001.tar"]
    err = capsys.readouterr().err
    assert "s-001.tar: 1 samples have an empty or missing caption (1x1)" in err


def test_data_check_names_a_damaged_shard_and_goes_on(tmp_path, capsys):
    from openclip_align.cli import main

    good = make_shard(tmp_path / "a.tar", plain_samples(["a0"]))
    bad = make_shard(tmp_path / "b.tar", plain_samples([f"b{i}" for i in range(5)]))
    open(bad, "r+b").truncate(1700)
    assert main(["data", "check", "--data", str(tmp_path), "--workers", "1", "--no-progress"]) == 1
    assert "b.tar cannot be read to its end" in capsys.readouterr().err
    assert list(read_record(str(tmp_path))["shards"]) == [os.path.basename(good)]


def test_data_check_writes_sizes_json_by_the_one_rule(tmp_path):
    """sizes.json counts the samples training takes from each shard: all but those with an empty caption
    (hand count: a.tar 3 - 1, b.tar 2), the count embed writes too; an existing one is left as it is."""
    from openclip_align.data.check_shards import check_shards

    make_shard(tmp_path / "a.tar", plain_samples(["a0", "a1", "a2"], captions=["one", "", "three"]))
    make_shard(tmp_path / "b.tar", plain_samples(["b0", "b1"]))
    found = check_shards(str(tmp_path), progress=False)
    assert any("1 samples have an empty or missing caption (a1)" in p for p in found["problems"])
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"a.tar": 2, "b.tar": 2}
    (tmp_path / "sizes.json").write_text('{"a.tar": 1, "b.tar": 1}')
    check_shards(str(tmp_path), progress=False)
    assert (tmp_path / "sizes.json").read_text() == '{"a.tar": 1, "b.tar": 1}'
