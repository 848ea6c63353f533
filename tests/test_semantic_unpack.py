"""The all-mpnet-base-v2 unpack (issue 29 item 6): processes racing on a fresh cache unpack it once, and each
finds a complete model folder."""
from __future__ import annotations

import io
import multiprocessing as mp
import zipfile
from pathlib import Path

from openclip_align.data import semantic


def _slices(folder: Path, parts: int = 3):
    """A small zip with one top-level folder holding modules.json, cut into ``parts`` byte slices."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/weights.bin", bytes(range(256)) * 4096)
    data = buffer.getvalue()
    step = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = folder / f"slice.zip.{i + 1:03d}"
        path.write_bytes(data[i * step:(i + 1) * step])
        paths.append(path)
    return paths


def _racer(cache: str, slices, log: str, barrier, results) -> None:
    import os

    os.environ[semantic.CACHE_ENV] = cache
    semantic._mpnet_slices = lambda: slices
    extract = zipfile.ZipFile.extractall

    def counted(self, *args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return extract(self, *args, **kwargs)

    zipfile.ZipFile.extractall = counted
    barrier.wait()                                        # all start on the empty cache at once
    root = semantic.mpnet_path()
    results.put((str(root), (root / "modules.json").read_text(), len((root / "weights.bin").read_bytes())))


def test_processes_racing_on_a_fresh_cache_unpack_the_encoder_once(tmp_path):
    slices = _slices(tmp_path)
    cache, log = tmp_path / "cache", tmp_path / "extractions.log"
    context = mp.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_racer, args=(str(cache), slices, str(log), barrier, results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    found = [results.get(timeout=5) for _ in processes]
    expected = str(cache / "models" / semantic.MPNET / "all-mpnet-base-v2")
    assert found == [(expected, "[]", 256 * 4096)] * 4
    assert len(log.read_text().splitlines()) == 1                         # one process unpacked it
    assert sorted(p.name for p in (cache / "models").iterdir()) == [semantic.MPNET, semantic.MPNET + ".lock"]
