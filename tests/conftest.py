"""Shared fixtures: small sets of REAL images with captions, made offline from installed packages."""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIGIT_NAMES = "zero one two three four five six seven eight nine".split()


def write_digits_csv(directory: Path, n: int = 48, size: int = 32, start: int = 0) -> Path:
    """scikit-learn's handwritten digits (real scans) as PNG files plus an OpenCLIP csv."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    image_dir = directory / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(start, start + n):
        pixels = (255 - digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        path = image_dir / f"digit_{i:05d}.png"
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB").save(path)
        style = ("a handwritten digit", "a scan of the number", "the numeral")[i % 3]
        rows.append(f"{path}\t{style} {DIGIT_NAMES[digits.target[i]]}")
    csv = directory / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def write_digits_corpus(directory: Path, n_train: int, n_heldout: int = 64, size: int = 32) -> Path:
    """A corpus laid out like the embedded default, from disjoint digit scans: train.csv, heldout.csv and
    a zero-shot set (zeroshot/digits.csv + .json with the class names "zero".."nine")."""
    import json
    import shutil

    from sklearn.datasets import load_digits

    directory.mkdir(parents=True, exist_ok=True)
    write_digits_csv(directory / "t", n=n_train, size=size)
    write_digits_csv(directory / "h", n=n_heldout, size=size, start=n_train)
    shutil.move(directory / "t" / "train.csv", directory / "train.csv")
    shutil.move(directory / "h" / "train.csv", directory / "heldout.csv")
    labels = load_digits().target
    zeroshot = directory / "zeroshot"
    zeroshot.mkdir()
    rows = ["filepath\tlabel"] + [f"{directory / 'h' / 'images' / f'digit_{i:05d}.png'}\t{labels[i]}"
                                  for i in range(n_train, n_train + n_heldout)]
    (zeroshot / "digits.csv").write_text("\n".join(rows) + "\n")
    (zeroshot / "digits.json").write_text(json.dumps(
        {"classnames": DIGIT_NAMES, "templates": ["a handwritten digit {}", "the numeral {}"]}))
    return directory


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Path:
    return write_digits_csv(tmp_path_factory.mktemp("digits"), n=48)   # 3 steps of batch 16
