"""Small helpers shared by the column, the record and their writers: a shard's file name in a url or
``pipe:`` command, a walk over a shard's samples that never reads the images, the stat and hashes that
tell a shard apart."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from typing import Dict, FrozenSet, Iterable, Iterator, Optional, Sequence, Tuple

from .errors import CorpusError

SHOWN = 3

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")      # webdataset's KEY.suffix split of a member name
REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")       # a url or pipe: command, not a local path
_SHARD_NAME = re.compile(r"([^/\s]+?\.tar)(?=\s|$|\?)")  # the shard file name inside a url or pipe: command


def listed(labels: Sequence[str], shown: int = SHOWN) -> str:
    return ", ".join(labels[:shown]) + (f" and {len(labels) - shown} more" if len(labels) > shown else "")


def shard_name(shard_url: str) -> str:
    """``NAME.tar`` of a local path, a URL or a ``pipe:`` command (the last ``*.tar`` it names)."""
    found = _SHARD_NAME.findall(str(shard_url))
    return found[-1] if found else os.path.basename(str(shard_url).rstrip("/"))


def keys_sha256(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def caption_text(raw) -> str:
    """``KEY.txt`` bytes (or an already decoded str) as the text webdataset's decoder gives the trainer."""
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)


def keys_sha256_of_shard(path: str) -> Tuple[int, str]:
    """(sample count, keys hash) of a local shard by a walk over its tar headers (no member is read)."""
    keys = [key for key, _ in iter_samples(path, frozenset())]
    return len(keys), keys_sha256(keys)


def fingerprint(path: str) -> Tuple[int, int]:
    """(bytes, mtime_ns): what tells that a file changed since it was recorded."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def compact_json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")

def iter_samples(path: str, wanted: FrozenSet[str]) -> Iterator[Tuple[str, Dict[str, Optional[bytes]]]]:
    """(key, {suffix: bytes, or None when not wanted}) per sample, in tar order, keys as webdataset forms
    them. Members not in ``wanted`` (images) are never read: tarfile seeks over them."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isfile() else None
                if not match:
                    continue
                prefix, suffix = match.groups()
                if prefix != key:
                    if key is not None:
                        yield key, members
                    key, members = prefix, {}
                members[suffix] = tar.extractfile(member).read() if suffix in wanted else None
    except (tarfile.TarError, EOFError, OSError) as err:
        where = f"after sample {key}" if key is not None else "at its start"
        raise CorpusError(f"shard {path} cannot be read to its end {where} ({err}); it is damaged or truncated: "
                          "rebuild or re-download it") from err
    if key is not None:
        yield key, members


def index_of(raw: Optional[bytes]) -> Optional[int]:
    """The integer ``"index"`` of a KEY.json, or None."""
    try:
        value = json.loads(raw).get("index") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_json(path: str, fix: str):
    """The json at ``path``, or None when there is no file; a damaged file is named with ``fix``."""
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise CorpusError(f"{path} is not valid json ({err}); delete it and {fix}") from err
