"""Atomic file writes, shared by every module that writes outputs (data, embeddings, results, checkpoints).

A file is written under a temporary sibling name (``<final name>.tmp-<pid>``, same directory, so the
rename never crosses a file system), flushed and fsync'ed, then ``os.replace``'d onto its final name and
the directory entry fsync'ed. A reader therefore sees either the previous file or the complete new one,
never a truncated file under the final name, whatever kills the writer.

The temporary file is created with plain ``open`` (mode 0666 filtered by the umask), so the final file
gets the permissions every other output gets; ``tempfile.mkstemp`` would give 0600 instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]

TMP_MARK = ".tmp-"            # temporary names are "<final name>.tmp-<pid>": never end in .tar/.pt/.json


def temp_name(final: PathLike) -> Path:
    final = Path(final)
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside ``directory`` durable (best effort where the file system cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(base: int = 0o666) -> int:
    """``base`` filtered by the process umask: the mode a plain ``open``/``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_open(final: PathLike, mode: str = "wb", fsync: bool = True, **kwargs) -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``final`` for writing; on success fsync and rename it onto ``final``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``final`` is left as
    it was. ``fsync=False`` keeps the atomic rename but skips the flush to disk (for many small files
    whose completeness is vouched for by a manifest written, and fsync'ed, after them).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    f = open(tmp, mode, **kwargs)
    try:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        if fsync:
            fsync_dir(final.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(final: PathLike, data: bytes, fsync: bool = True) -> Path:
    with atomic_open(final, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(final)


def atomic_write_text(final: PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def json_bytes(obj) -> bytes:
    """Canonical JSON (sorted keys, UTF-8, trailing newline) so equal content means equal bytes: the form of
    every JSON file a corpus holds (manifest, sizes, metadata), so a rebuild of equal content is byte-identical."""
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def atomic_write_json(final: PathLike, obj) -> Path:
    return atomic_write_bytes(final, json_bytes(obj))


def stale_temps(directory: PathLike, pattern: str = "*") -> list:
    """Temporaries matching ``pattern`` + our mark in ``directory`` whose writer process is gone."""
    found = []
    for path in Path(directory).glob(f"{pattern}{TMP_MARK}*"):
        pid = path.name.rsplit(TMP_MARK, 1)[-1]
        if path.is_file() and not (pid.isdigit() and _alive(int(pid))):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
