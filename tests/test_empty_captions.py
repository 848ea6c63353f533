"""One rule for empty or missing captions in `openclip-align embed` and `data build` (issue 16); the
trainer's side is in test_training_data_checks.py."""
import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from openclip_align.cli import main  # noqa: E402
from openclip_align.data import build, captions, semantic  # noqa: E402
from openclip_align.data import shards as sh  # noqa: E402
from openclip_align.data.pairs import SourceStats  # noqa: E402
from openclip_align.data.embed import embed_csv, embed_shards  # noqa: E402
from openclip_align.data.errors import EmptyCaptionError  # noqa: E402
from openclip_align.data.sources import Item  # noqa: E402


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("value, empty", [(None, True), (float("nan"), True), ("", True), (" \t\n", True),
                                          (b"  ", True), ("nan", False), ("0", False), (b"a cat", False)])
def test_what_counts_as_empty(value, empty):
    assert captions.is_empty(value) is empty


@pytest.fixture
def csv_with_blank(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath\ttitle\na.png\ta red apple\nb.png\t\nc.png\tgrinning face\nd.png\t  \n")
    return path


def test_embed_csv_refuses_empty_captions_by_row(csv_with_blank, capsys):
    before = _sha(csv_with_blank)
    with pytest.raises(EmptyCaptionError, match=r"2 of 4 pairs .*row 1 \(line 3\), row 3 \(line 5\)"):
        embed_csv(csv_with_blank, model="all-MiniLM-L6-v2", progress=False)
    assert main(["embed", "--data", str(csv_with_blank), "--model", "all-MiniLM-L6-v2", "--no-progress"]) == 2
    assert "--drop-empty-captions" in capsys.readouterr().err
    assert _sha(csv_with_blank) == before and sorted(os.listdir(csv_with_blank.parent)) == ["pairs.csv"]


def test_embed_csv_drops_them_into_a_copy_the_embeddings_follow(csv_with_blank):
    written = embed_csv(csv_with_blank, model="all-MiniLM-L6-v2", progress=False, drop_empty_captions=True)
    assert written["dropped_empty_captions"].startswith("2 rows (row 1 (line 3), row 3 (line 5)")
    copy = pd.read_csv(written["csv"], sep="\t", keep_default_na=False)
    assert copy.title.tolist() == ["a red apple", "grinning face"] and copy["index"].tolist() == [0, 1]
    emb = np.load(written["embeddings"])
    encoder = semantic.load_sentence_encoder("all-MiniLM-L6-v2")
    expected = semantic.embed_captions(encoder, ["a red apple", "grinning face"], progress=False)
    assert np.allclose(emb, expected, atol=1e-5)
    assert not (csv_with_blank.parent / "pairs.emb.npy").exists()     # would not line up with the original


def _shard(path, rows):
    sh.write_tar(path, [(key, [("png", b"\x89PNG"), ("txt", text.encode())] if text is not None
                         else [("png", b"\x89PNG")]) for key, text in rows])


def test_embed_shards_refuses_or_drops_empty_captions(tmp_path):
    from openclip_align.data.record import read_record

    src = tmp_path / "in"
    src.mkdir()
    _shard(src / "s-000000.tar", [("a", "a red apple"), ("b", " "), ("c", "grinning face")])
    _shard(src / "s-000001.tar", [("d", None), ("e", "flag Japan")])
    before = {p.name: _sha(p) for p in src.iterdir()}
    with pytest.raises(EmptyCaptionError, match=r"2 of 5 pairs .*s-000000.tar sample b.*s-000001.tar sample d"):
        embed_shards(src, tmp_path / "out", model="all-MiniLM-L6-v2", progress=False)
    assert not (tmp_path / "out").exists()
    rows = embed_shards(src, tmp_path / "out", model="all-MiniLM-L6-v2", progress=False, drop_empty_captions=True)
    assert rows == {"s-000000.tar": 2, "s-000001.tar": 1}
    meta = json.loads((tmp_path / "out" / "s-000000.emb.json").read_text())
    assert meta["keys"] == ["a", "c"] and meta["dropped_empty_captions"] == ["b"]
    assert read_record(str(tmp_path / "out"))["shards"]["s-000001.tar"]["empty_caption_keys"] == ["d"]
    assert {p.name: _sha(p) for p in src.iterdir() if p.suffix == ".tar"} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}


def test_data_build_refuses_or_drops_items_without_caption():
    items = [Item("emoji", "1F600", "grinning face", "x"), Item("emoji", "1F9FF", "  ", "y"),
             Item("emoji", "1F4A9", "", "z")]
    with pytest.raises(EmptyCaptionError, match=r"source emoji: 2 of 3 pairs .*item '1F9FF', item '1F4A9'"):
        build._without_empty_captions("emoji", items, SourceStats(), drop=False)
    stats = SourceStats()
    kept = build._without_empty_captions("emoji", items, stats, drop=True)
    assert [it.uid for it in kept] == ["1F600"] and stats.as_dict()["empty_captions_dropped"] == 2


def test_data_build_flag_reaches_the_builder(monkeypatch, tmp_path):
    seen = {}

    def fake_build(out, **kwargs):
        seen.update(kwargs)
        raise EmptyCaptionError("source emoji: 1 of 1 pairs have an empty or missing caption")
    monkeypatch.setattr(build, "build_corpus", fake_build)
    assert main(["data", "build", "--out", str(tmp_path), "--size", "small", "--drop-empty-captions"]) == 2
    assert seen["drop_empty_captions"] is True
