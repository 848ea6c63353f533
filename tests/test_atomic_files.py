"""Atomic writes keep the permissions the umask gives (issue 16: results.json came out 0600 from mkstemp)."""
import os

import pytest

from openclip_align import atomic_files
from openclip_align.experiments.benchmark_report import write_json_atomic
from openclip_align.data import shards as sh


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_every_atomic_writer_follows_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")                                          # what any ordinary output gets
    written = [tmp_path / "results.json", tmp_path / "meta.json", tmp_path / "shard-000000.tar"]
    write_json_atomic(written[0], {"a": 1})
    atomic_files.atomic_write_json(written[1], {"b": 2})
    sh.write_tar(written[2], [("k", [("txt", b"caption")])])
    assert [p.stat().st_mode & 0o777 for p in written] == [plain.stat().st_mode & 0o777] * 3 == [expected] * 3
    assert atomic_files.umask_mode() == expected


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"run": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(target, {"run": object()})                # not JSON: fails before any byte is written
    with pytest.raises(KeyboardInterrupt):
        with atomic_files.atomic_open(target, "w") as fh:
            fh.write('{"run": 2')
            raise KeyboardInterrupt
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["results.json"]


def test_stale_temporaries_are_those_of_dead_writers(tmp_path):
    mine = atomic_files.temp_name(tmp_path / "epoch_1.pt")
    mine.write_bytes(b"in progress")
    dead = tmp_path / f"epoch_2.pt{atomic_files.TMP_MARK}999999999"      # no such process
    dead.write_bytes(b"half")
    (tmp_path / "epoch_3.pt").write_bytes(b"done")
    assert atomic_files.stale_temps(tmp_path, "*.pt") == [dead]
