"""Deterministic, crash-safe output files: webdataset shards, csv/npy/json side files, PNG bytes.

Two promises the rest of the data code relies on:

* Rebuilding gives byte-identical files: tar members get fixed metadata (mtime, owner, mode) and a
  fixed order, JSON is written with sorted keys, PNGs are encoded with fixed settings and no
  metadata chunks.
* An interrupted build never leaves a file that looks complete: everything is written through
  :mod:`openclip_align.atomic_files` (temporary sibling, fsync, rename, directory fsync).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from openclip_align.atomic_files import TMP_MARK, atomic_open, atomic_write_bytes

from .sizes import remove_sizes, write_sizes

PathLike = Union[str, os.PathLike]

TAR_MTIME = 946684800         # 2000-01-01: a fixed, non-zero mtime (some tools warn about 0)
SHARD_PATTERN = "{prefix}-{shard:06d}.tar"


# --- canonical bytes, written atomically (:mod:`openclip_align.atomic_files`) ------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_write_npy(final: PathLike, array: np.ndarray) -> Path:
    return atomic_write_bytes(final, npy_bytes(array))


def remove_stale_temps(directory: PathLike) -> int:
    """Delete temporaries left by a killed build (only names carrying our temporary mark)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.rglob(f"*{TMP_MARK}*"):
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


# --- PNG ------------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    """PNG with fixed settings and no metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


# --- csv ------------------------------------------------------------------------------------
def tsv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Tab-separated text for pandas ``read_csv(sep="\\t")``; tabs/newlines in fields become spaces."""

    def clean(value) -> str:
        return " ".join(str(value).replace("\t", " ").splitlines())

    lines = ["\t".join(header)]
    lines.extend("\t".join(clean(v) for v in row) for row in rows)
    return "\n".join(lines) + "\n"


# --- tar shards -----------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


Sample = Tuple[str, Sequence[Tuple[str, bytes]]]   # (key, [(suffix, data), ...]) in member order


def write_tar(final: PathLike, samples: Iterable[Sample]) -> int:
    """Write one tar shard atomically; members ``KEY.suffix`` in the given order. Returns #samples."""
    count = 0
    with atomic_open(final, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if "." in key:
                    raise ValueError(f"webdataset keys must not contain '.': {key!r}")
                for suffix, data in members:
                    tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
                count += 1
    return count


def write_shards(directory: PathLike, prefix: str, samples: Iterable[Sample], shard_size: int,
                 progress: bool = False, total: Optional[int] = None, desc: str = "shards") -> Dict[str, int]:
    """Split ``samples`` into ``PREFIX-000000.tar ...`` of at most ``shard_size`` samples, then their sizes
    (:func:`.sizes.write_sizes`; every sample written is kept: the build has no empty captions).

    The sizes are written last, so a directory with sizes holds only complete shards.
    Shards from an earlier, larger build that this one does not write again are removed.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_sizes(directory)
    sizes: Dict[str, int] = {}
    iterator = iter(samples)
    bar = _progress(total, desc) if progress else None
    shard = 0
    while True:
        chunk: List[Sample] = []
        for sample in iterator:
            chunk.append(sample)
            if len(chunk) == shard_size:
                break
        if not chunk:
            break
        name = SHARD_PATTERN.format(prefix=prefix, shard=shard)
        sizes[name] = write_tar(directory / name, chunk)
        if bar is not None:
            bar.update(len(chunk))
        shard += 1
        if len(chunk) < shard_size:
            break
    if bar is not None:
        bar.close()
    for stale in directory.glob(f"{prefix}-*.tar"):
        if stale.name not in sizes:
            stale.unlink()
    write_sizes(directory, sizes)
    return sizes


def _progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False)


def read_tar(path: PathLike) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Samples of a tar shard as (key, {suffix: bytes}); members of one key must be consecutive."""
    current_key, current = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            key, dot, suffix = name.partition(".")
            if not dot:
                continue
            data = tar.extractfile(member).read()
            if key != current_key and current_key is not None:
                yield current_key, current
                current = {}
            current_key = key
            current[suffix] = data
    if current_key is not None:
        yield current_key, current


def list_shards(directory: PathLike, prefix: Optional[str] = None) -> List[Path]:
    pattern = f"{prefix}-*.tar" if prefix else "*.tar"
    return sorted(Path(directory).glob(pattern))


def shard_spec(directory: PathLike, sizes: Mapping[str, int]) -> str:
    """The brace pattern OpenCLIP's ``--train-data`` takes for these shards."""
    names = sorted(sizes)
    if not names:
        raise ValueError("no shards")
    prefix = names[0].rsplit("-", 1)[0]
    if len(names) == 1:
        return str(Path(directory) / names[0])
    return str(Path(directory) / f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar")
