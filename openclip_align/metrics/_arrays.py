"""Input handling shared by the metrics: torch or numpy in, validated float arrays out.

Large inputs are never copied whole to float64: callers stream them in row blocks
(:func:`iter_normalized_blocks`) and only small subsamples are materialised in float64.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

# Rows per block when streaming: 4096 x 768 float64 is 25 MB, small next to the inputs.
BLOCK_ROWS = 4096


def as_matrix(features, name: str = "features") -> np.ndarray:
    """Return a 2-D numpy view (no copy for CPU float32/float64 inputs) of a tensor or array."""
    if hasattr(features, "detach") and hasattr(features, "cpu"):  # torch.Tensor without importing torch
        tensor = features.detach().cpu()
        if tensor.dtype.is_floating_point and tensor.dtype not in _torch_numpy_floats():
            tensor = tensor.float()  # bfloat16 / float16 have no (or a lossy) numpy twin
        features = tensor.numpy()
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows x dim) matrix, got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    elif array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    return array


def _torch_numpy_floats():
    import torch

    return (torch.float32, torch.float64)


def check_pair(image_features, text_features, min_rows: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """Validate paired inputs: same shape, at least ``min_rows`` rows."""
    x = as_matrix(image_features, "image_features")
    y = as_matrix(text_features, "text_features")
    if x.shape != y.shape:
        raise ValueError(f"image_features and text_features must have the same shape (paired rows), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} pairs, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError("features have zero dimensions")
    return x, y


def check_single(features, name: str = "features", min_rows: int = 2) -> np.ndarray:
    u = as_matrix(features, name)
    if u.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} rows, got {u.shape[0]}")
    if u.shape[1] < 1:
        raise ValueError(f"{name} has zero dimensions")
    return u


def normalize_rows(block: np.ndarray, name: str = "features", offset: int = 0) -> np.ndarray:
    """L2-normalise rows in float64, raising on NaN/inf or all-zero rows (their direction is undefined)."""
    block = np.asarray(block, dtype=np.float64)
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        row = offset + int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name} contains NaN or inf (first at row {row})")
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    if (norms == 0).any():
        row = offset + int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{name} has an all-zero row ({row}); it cannot be L2-normalised")
    return block / norms


def like_input(array: np.ndarray, template):
    """``array`` as the same kind as ``template``: a torch tensor (same device and float dtype) for tensor
    inputs, float64 numpy otherwise."""
    if hasattr(template, "detach") and hasattr(template, "device"):
        import torch

        dtype = template.dtype if template.dtype.is_floating_point else torch.float32
        return torch.from_numpy(array).to(device=template.device, dtype=dtype)
    return array


def iter_normalized_blocks(x: np.ndarray, name: str, rows=None) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(start, normalised float64 block)`` over the rows of ``x``."""
    rows = rows or BLOCK_ROWS
    for start in range(0, x.shape[0], rows):
        yield start, normalize_rows(x[start:start + rows], name, start)


def subsample_indices(n: int, max_rows, seed: int) -> np.ndarray:
    """Sorted deterministic subset of ``range(n)`` of size ``min(n, max_rows)`` (all rows when it fits)."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    if max_rows < 2:
        raise ValueError(f"max_pairs must be at least 2, got {max_rows}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_rows), replace=False))
