"""Deterministic, crash-safe file writing (no corpus needed: fast)."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from openclip_align.atomic_files import TMP_MARK, atomic_open
from openclip_align.data import shards as sh
from openclip_align.data.sizes import SIZES_FILE


def _samples(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("simulated crash while writing")
        image = Image.new("RGB", (8, 8), (i * 20 % 255, 10, 200))
        yield f"{i:09d}", [("png", sh.png_bytes(image)), ("txt", f"caption {i}".encode()),
                           ("emb.npy", sh.npy_bytes(np.full(4, i, dtype=np.float32)))]


def test_interrupted_shard_write_leaves_no_file_under_final_name(tmp_path):
    final = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        sh.write_tar(final, _samples(10, fail_at=5))
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []          # the temporary file is gone too


def test_interrupt_keeps_previous_complete_file(tmp_path):
    final = tmp_path / "train-000000.tar"
    sh.write_tar(final, _samples(3))
    before = final.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(final) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert final.read_bytes() == before


def test_interrupted_write_shards_has_no_sizes_json(tmp_path):
    with pytest.raises(RuntimeError):
        sh.write_shards(tmp_path, "train", _samples(25, fail_at=15), shard_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]   # complete shard only
    assert not (tmp_path / SIZES_FILE).exists()


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f"train-000000.tar{TMP_MARK}123"
    stale.write_bytes(b"x")
    keep = tmp_path / "sub" / "train-000000.tar"
    keep.write_bytes(b"y")
    assert sh.remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and keep.exists()


def test_shards_are_byte_identical_and_have_fixed_metadata(tmp_path):
    a = sh.write_shards(tmp_path / "a", "train", _samples(23), shard_size=10)
    b = sh.write_shards(tmp_path / "b", "train", _samples(23), shard_size=10)
    assert a == b == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 3}
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.png", "000000000.txt", "000000000.emb.npy"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(sh.TAR_MTIME, 0, 0, "", "", 0o644)}


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    sh.write_shards(tmp_path, "train", _samples(25), shard_size=10)
    sizes = sh.write_shards(tmp_path, "train", _samples(5), shard_size=10)
    assert sizes == {"train-000000.tar": 5}
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar"]
    assert sh.shard_spec(tmp_path, sizes).endswith("train-000000.tar")


def test_read_tar_round_trip(tmp_path):
    sh.write_tar(tmp_path / "x.tar", _samples(4))
    samples = list(sh.read_tar(tmp_path / "x.tar"))
    assert [k for k, _ in samples] == [f"{i:09d}" for i in range(4)]
    key, members = samples[2]
    assert members["txt"] == b"caption 2"
    assert np.load(io.BytesIO(members["emb.npy"])).tolist() == [2.0] * 4
    assert Image.open(io.BytesIO(members["png"])).size == (8, 8)


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError):
        sh.write_tar(tmp_path / "x.tar", [("a.b", [("txt", b"x")])])
    assert not (tmp_path / "x.tar").exists()


def test_tsv_text_keeps_one_row_per_record():
    text = sh.tsv_text(("a", "b"), [("x\ty", "line\nbreak")])
    assert text == "a\tb\nx y\tline break\n"


def test_missing_package_error_names_the_install_command(monkeypatch):
    from openclip_align.data.packages import MissingPackageError, Requirement, ensure

    reqs = [Requirement("no-such-debian-package", "apt", "/nonexistent/openclip-align/file", why="test"),
            Requirement("no-such-pypi-package", "pip", "no_such_module_openclip_align", why="test")]
    with pytest.raises(MissingPackageError) as err:
        ensure(reqs, install=False)
    message = str(err.value)
    assert "apt-get install -y --no-install-recommends no-such-debian-package" in message
    assert "pip install no-such-pypi-package" in message
