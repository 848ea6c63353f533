"""Fashion-MNIST (Debian dataset-fashion-mnist, MIT): a 10-class zero-shot classification set.

We read the official test split (t10k idx files) and keep a class-balanced subset: the first
``per_class`` images of each class in file order. Images are inverted back to dark-on-white (the
dataset stores inverted product photos) so they look like the rest of the corpus.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..packages import Requirement

NAME = "fashion_mnist"
ROOT = Path("/usr/share/datasets/fashion-mnist")
# the official test split, named once: the requirement checks for the images, load() reads both
TEST_IMAGES, TEST_LABELS = ROOT / "t10k-images-idx3-ubyte.gz", ROOT / "t10k-labels-idx1-ubyte.gz"
LICENCE = "MIT (Zalando Research; see /usr/share/doc/dataset-fashion-mnist/copyright)"
REQUIREMENTS = (
    Requirement("dataset-fashion-mnist", "apt", str(TEST_IMAGES), "MIT", "Fashion-MNIST (zero-shot classification)"),
)
# the official class names, in label order (github.com/zalandoresearch/fashion-mnist#labels)
CLASSNAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "an icon of a {}.",
             "a black and white photo of a {}.", "a low resolution photo of a {}."]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(picked))


def load(per_class: int = 100) -> Tuple[List[np.ndarray], List[int]]:
    """(grey uint8 images, labels), dark on white, ``per_class`` of each class from the test split."""
    images = _read_idx(TEST_IMAGES)
    labels = _read_idx(TEST_LABELS).astype(np.int64)
    keep = balanced_indices(labels, per_class)
    return [255 - images[i] for i in keep], [int(labels[i]) for i in keep]
