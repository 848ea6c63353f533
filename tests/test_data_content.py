"""The corpus content hash (openclip_align/data/content.py): what it covers, what it ignores."""
import hashlib
import json

import pytest

from openclip_align.data.content import content_hash, content_of_files

PAIRS = [("train", "a red apple", b"PNG-apple"), ("train", "a cat", b"PNG-cat"), ("heldout", "a dog", b"PNG-dog")]


def by_hand(pairs):
    digests = sorted(hashlib.sha256(s.encode() + b"\0" + t.encode() + b"\0" + hashlib.sha256(i).digest()).digest()
                     for s, t, i in pairs)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def test_the_hash_is_the_documented_formula_and_ignores_the_row_order():
    content = content_hash(PAIRS)
    assert content["sha256"] == by_hand(PAIRS)
    assert content["pairs"] == {"heldout": 1, "train": 2}
    shuffled = content_hash(PAIRS[::-1])
    assert shuffled["sha256"] == content["sha256"]
    assert shuffled["order_sha256"] != content["order_sha256"]          # the order is recorded, apart


@pytest.mark.parametrize("changed", [("heldout", "a red apple", b"PNG-apple"),      # another split
                                     ("train", "a red apple.", b"PNG-apple"),       # another caption
                                     ("train", "a red apple", b"PNG-applf")])       # one image byte
def test_any_change_to_a_pair_is_another_corpus(changed):
    assert content_hash([changed, *PAIRS[1:]])["sha256"] != content_hash(PAIRS)["sha256"]


def test_hashed_from_files_wherever_the_corpus_lies(tmp_path):
    """Two copies of one corpus in two folders (absolute image paths differ) have one hash: the bytes count,
    not where they are; zero-shot rows count with their class names, and the templates count."""
    hashes = []
    for where in ("one", "two"):
        data = tmp_path / where
        (data / "images").mkdir(parents=True)
        (data / "zeroshot").mkdir()
        rows = ["filepath\ttitle\tindex\tsource"]
        for i, (split, text, image) in enumerate(PAIRS[:2]):
            (data / "images" / f"{i}.png").write_bytes(image)
            rows.append(f"{data}/images/{i}.png\t{text}\t{i}\temoji")
        (data / "train.csv").write_text("\n".join(rows) + "\n")
        (data / "zeroshot" / "digits.csv").write_text(f"filepath\tlabel\n{data}/images/0.png\t1\n")
        (data / "zeroshot" / "digits.json").write_text(json.dumps({"classnames": ["zero", "one"],
                                                                   "templates": ["a photo of {c}."]}))
        hashes.append(content_of_files(data))
    assert hashes[0] == hashes[1]
    expected = [*PAIRS[:2], ("zeroshot/digits", "one", b"PNG-apple"), ("zeroshot/digits", "a photo of {c}.", b"")]
    assert hashes[0]["sha256"] == by_hand(expected)
    assert hashes[0]["pairs"] == {"train": 2, "zeroshot/digits": 2}


def test_a_missing_image_names_the_csv_and_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("filepath\ttitle\n/nowhere/0.png\tx\n")
    with pytest.raises(FileNotFoundError, match=r"train.csv: image /nowhere/0.png is missing.*data build"):
        content_of_files(tmp_path)
