"""The embedded default corpus: built once per session at ``small`` size (emoji, 32 px, MiniLM)."""
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from openclip_align.atomic_files import TMP_MARK  # noqa: E402
from openclip_align.data import shards as sh  # noqa: E402
from openclip_align.data.build import build_corpus  # noqa: E402

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SIZE = 32


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus_small")
    manifest = build_corpus(out, size="small", encoder="all-MiniLM-L6-v2", progress=False)
    return out, manifest


def _csv(path):
    return pd.read_csv(path, sep="\t", keep_default_na=False)


def _shard_samples(directory: Path):
    for shard in sh.list_shards(directory):
        yield from sh.read_tar(shard)


def test_layout_and_manifest(corpus):
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["image_size"] == SIZE and manifest["encoder"]["model"] == "all-MiniLM-L6-v2"
    emoji = manifest["sources"]["emoji"]
    assert "OFL" in emoji["licence"] and emoji["packages"]["fonts-noto-color-emoji"]["registry"] == "debian"
    assert manifest["sources"]["fashion_mnist"]["licence"].startswith("MIT")
    assert manifest["split"]["unit"] == "base"
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    assert sorted(sizes) == [p.name for p in sh.list_shards(out / "train")]
    assert sum(sizes.values()) == manifest["counts"]["train"] > 1000
    assert len(sizes) >= 2                      # enough shards for 2 dataloader workers
    assert manifest["counts"]["heldout"] > 100
    assert list(_csv(out / "train.csv").columns) == ["filepath", "title", "index", "source"]
    assert not list(out.rglob(f"*{TMP_MARK}*"))


def test_manifest_content_hash_covers_the_pairs_the_shards_hold(corpus):
    """The manifest's content hash (made from the csv files and images) equals one made a second way: the
    training and held-out pairs read from the webdataset shards' txt/png members, the rest from the files."""
    from openclip_align.data.content import content_hash, corpus_pairs

    out, manifest = corpus
    from_shards = [(split, sample["txt"].decode("utf-8"), sample["png"])
                   for split in ("train", "heldout") for _, sample in _shard_samples(out / split)]
    rest = [pair for pair in corpus_pairs(out) if pair[0] not in ("train", "heldout")]
    assert {p[0] for p in rest} == {f"zeroshot/{name}" for name in manifest["zeroshot"]}
    assert manifest["content"]["sha256"] == content_hash(from_shards + rest)["sha256"]
    assert manifest["content"]["pairs"]["train"] == manifest["counts"]["train"]
    assert manifest["format_version"] == 2


_TONE = re.compile(r"\b(light|medium-light|medium|medium-dark|dark) skin tone\b")
_GENDER = {"man", "woman", "person", "men", "women", "people", "boy", "girl", "child", "adult", "old", "older"}


def _stripped(caption):
    """Caption without skin tone and gender words: variants of one emoji collapse to one string."""
    return " ".join(w for w in re.split(r"[\s,:]+", _TONE.sub(" ", caption.lower())) if w and w not in _GENDER)


def test_split_by_base_emoji_is_leak_free(corpus):
    out, _ = corpus
    train, held = _csv(out / "train.csv"), _csv(out / "heldout.csv")
    bases = {}
    for name in ("train", "heldout"):
        bases[name] = {json.loads(m["json"])["base"] for _, m in _shard_samples(out / name)}
    assert bases["train"] and bases["heldout"] and not bases["train"] & bases["heldout"]
    # independent of the builder's own grouping: no variant name on both sides
    train_names = {_stripped(c) for c in train["title"]}
    held_names = {_stripped(c) for c in held["title"]}
    assert not train_names & held_names
    assert not set(train["title"]) & set(held["title"])
    # variants really are in the corpus (so the check above means something)
    variants = [c for c in pd.concat([train["title"], held["title"]]) if "medium skin tone" in c]
    assert len(variants) > 100
    for word in ("technologist", "firefighter", "astronaut"):
        sides = {name for name, df in (("train", train), ("heldout", held)) if df["title"].str.contains(word).any()}
        assert len(sides) == 1, word


def test_captions_non_empty_images_decode_indices_stable(corpus):
    out, _ = corpus
    emb = np.load(out / "train.emb.npy")
    meta = json.loads((out / "train.emb.json").read_text())
    for name in ("train", "heldout"):
        df = _csv(out / f"{name}.csv")
        assert df["index"].tolist() == list(range(len(df)))
        assert (df["title"].str.strip().str.len() > 0).all()
        assert set(df["source"]) == {"emoji"}
        for path in df["filepath"]:
            assert os.path.isabs(path) and path.startswith(str(out / "images"))
            with Image.open(path) as im:
                assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        for key, members in _shard_samples(out / name):
            assert set(members) == {"png", "txt", "json"}     # caption embeddings: the column beside, never inside
            info = json.loads(members["json"])
            row = df.iloc[info["index"]]
            assert key == f"{info['index']:09d}"
            assert members["txt"].decode() == info["caption"] == row["title"]
            assert info["source"] == "emoji" and info["base"].startswith("emoji:")
            assert members["png"] == Path(row["filepath"]).read_bytes()
            Image.open(io.BytesIO(members["png"])).verify()
    assert meta == {"model": "all-MiniLM-L6-v2", "dim": 384, "n": len(emb), "normalized": True}
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_build_writes_the_column_and_the_record_of_its_shards(corpus):
    from openclip_align.data.column import ColumnReader
    from openclip_align.data.preflight import verify_record

    out, manifest = corpus
    emb = np.load(out / "train.emb.npy")
    shards = [str(p) for p in sh.list_shards(out / "train")]
    reader = ColumnReader(expected_width=384, expected_model="all-MiniLM-L6-v2")
    for shard in shards:
        for key, members in sh.read_tar(shard):
            i = json.loads(members["json"])["index"]
            assert np.allclose(reader.lookup(shard, key), emb[i], atol=2e-3)        # float16 of the same row
            assert reader.index(shard, key) == i
    check = verify_record(shards, needs_index=True, needs_semantic=True, expected_width=384,
                          expected_model="all-MiniLM-L6-v2", batch_size=8, workers=2)
    assert not check.unrecorded and check.samples == len(emb) == manifest["counts"]["train"]
    assert set(check.semantic_from.values()) == {"column"}


def test_training_finds_the_column_of_built_shards_by_default(corpus):
    """imsep/sogclr on `data build` shards without --semantic-embeddings: the plan comes from the record
    and every decoded sample gets the embedding of its own index (train.emb.npy's row, float16 away)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _shard_fixtures import decoded_extras, shard_args

    out, manifest = corpus
    emb = np.load(out / "train.emb.npy")
    pattern = str(out / manifest["files"]["train"]["shards"])
    rows = decoded_extras(pattern, shard_args(pattern, loss="sogclr", semantic_embeddings=None), index=True)
    indices = [r["index"] for r in rows]
    assert sorted(indices) == list(range(len(emb)))
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in indices]
    np.testing.assert_allclose(np.stack([r["semantic"].numpy() for r in rows]), emb[indices], atol=2e-3)


def _open_clip_args(argv):
    from open_clip_train.params import parse_args

    args = parse_args(argv)
    args.world_size, args.rank, args.local_rank, args.distributed = 1, 0, 0, False
    return args


def _preprocess_and_tokenizer():
    import open_clip

    return open_clip.image_transform(SIZE, is_train=False), open_clip.get_tokenizer("ViT-B-32")


def test_webdataset_round_trip_through_open_clip_train(corpus):
    import torch
    from open_clip_train.data import get_wds_dataset

    out, manifest = corpus
    preprocess, tokenizer = _preprocess_and_tokenizer()
    spec = str(out / manifest["files"]["train"]["shards"])
    df = _csv(out / "train.csv")

    args = _open_clip_args(["--train-data", spec, "--dataset-type", "webdataset", "--batch-size", "256",
                            "--workers", "0", "--model", "RN50"])
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    assert info.dataloader.num_samples >= len(df)      # sizes.json read; rounded up to whole batches
    images, texts = next(iter(info.dataloader))
    assert images.shape == (256, 3, SIZE, SIZE) and texts.shape == (256, 77)
    expected_tokens = {tuple(t.tolist()) for t in tokenizer(df["title"].tolist())}
    assert {tuple(t.tolist()) for t in texts} <= expected_tokens

    # evaluation path: no shuffling, so every pair comes back in order, pixel- and token-exact
    args = _open_clip_args(["--val-data", spec, "--dataset-type", "webdataset", "--batch-size", "500",
                            "--workers", "0", "--model", "RN50"])
    info = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    all_images, all_texts = zip(*info.dataloader)
    all_images, all_texts = torch.cat(all_images), torch.cat(all_texts)
    assert len(all_images) == len(df)
    assert torch.equal(all_texts, tokenizer(df["title"].tolist()))
    for i in (0, 1, len(df) // 2, len(df) - 1):
        with Image.open(df["filepath"][i]) as im:
            assert torch.equal(all_images[i], preprocess(im.convert("RGB")))


def test_csv_round_trip_through_open_clip_train(corpus):
    import torch
    from open_clip_train.data import get_csv_dataset

    out, _ = corpus
    preprocess, tokenizer = _preprocess_and_tokenizer()
    df = _csv(out / "train.csv")
    args = _open_clip_args(["--train-data", str(out / "train.csv"), "--dataset-type", "csv",
                            "--csv-img-key", "filepath", "--csv-caption-key", "title",
                            "--batch-size", "64", "--workers", "0", "--model", "RN50"])
    info = get_csv_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    dataset = info.dataloader.dataset
    assert info.dataloader.num_samples == len(dataset) == len(df)
    for i in (0, 7, len(df) - 1):
        item = dataset[i]
        image, text = item[0], item[1]
        with Image.open(df["filepath"][i]) as im:
            assert torch.equal(image, preprocess(im.convert("RGB")))
        assert torch.equal(text, tokenizer([df["title"][i]])[0])
    images, texts = next(iter(info.dataloader))[:2]
    assert images.shape == (64, 3, SIZE, SIZE)


def test_plain_webdataset_keeps_index_and_the_column_lines_up(corpus):
    """A plain webdataset reader sees image, caption and index; each shard's column row r is the embedding
    of the shard's r-th sample (float16 of train.emb.npy's row of that sample's index)."""
    import webdataset as wds

    out, manifest = corpus
    emb = np.load(out / "train.emb.npy")
    titles = _csv(out / "train.csv")["title"].tolist()
    ds = wds.WebDataset(str(out / manifest["files"]["train"]["shards"]), shardshuffle=False).decode("pil")
    seen, rows = [], {}
    for sample in ds:
        i = sample["json"]["index"]
        seen.append(i)
        assert sample["__key__"] == f"{i:09d}"
        assert sample["txt"] == titles[i]
        assert "emb.npy" not in sample
        assert sample["png"].size == (SIZE, SIZE)
        rows.setdefault(Path(sample["__url__"]).with_suffix(".emb.npy"), []).append(i)
    assert seen == list(range(len(emb)))
    assert len(rows) == len(sh.list_shards(out / "train"))
    for column, indices in rows.items():
        values = np.load(column)
        assert values.dtype == np.float16 and values.shape == (len(indices), emb.shape[1])
        np.testing.assert_allclose(values.astype(np.float32), emb[indices], atol=2e-3)


def test_zero_shot_sets(corpus):
    out, manifest = corpus
    for name, classes in (("fashion_mnist", FASHION_MNIST_CLASSES),
                          ("digits", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])):
        spec = json.loads((out / "zeroshot" / f"{name}.json").read_text())
        assert set(spec) == {"classnames", "templates"}
        assert spec["classnames"] == classes
        assert spec["templates"] and all("{}" in t for t in spec["templates"])
        df = _csv(out / "zeroshot" / f"{name}.csv")
        assert list(df.columns) == ["filepath", "label"]
        counts = np.bincount(df["label"], minlength=10)
        assert len(counts) == 10 and counts.min() == counts.max() > 0      # balanced
        for path in df["filepath"][::37]:
            with Image.open(path) as im:
                assert im.mode == "RGB" and im.size == (SIZE, SIZE)
        assert manifest["counts"]["zeroshot"][name] == len(df)


def test_rebuild_is_byte_identical(corpus, tmp_path):
    out, manifest = corpus
    again = build_corpus(tmp_path, size="small", encoder="all-MiniLM-L6-v2", progress=False)
    assert again == manifest
    stamped = lambda p: p.name == "openclip_align_record.json" or p.parent.name in ("train", "heldout") and \
        p.name.endswith(".emb.json")                      # they record the shards' mtimes: compared below
    names = [p.relative_to(out) for p in sorted(out.rglob("*")) if p.is_file() and p.suffix != ".csv"
             and not stamped(p)]
    assert any(n.suffix == ".tar" for n in names) and any(n.suffix == ".png" for n in names)
    for rel in names:
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel

    def unstamped(obj):
        if isinstance(obj, dict):
            return {k: unstamped(v) for k, v in obj.items() if not k.endswith("mtime_ns") and k != "dir"}
        return obj

    for path in filter(stamped, out.rglob("*")):
        rel = path.relative_to(out)
        assert unstamped(json.loads((tmp_path / rel).read_text())) == unstamped(json.loads(path.read_text())), rel
    for csv in out.rglob("*.csv"):           # csv files differ only in the absolute image paths
        rel = csv.relative_to(out)
        assert (tmp_path / rel).read_text().replace(str(tmp_path), "DIR") == csv.read_text().replace(str(out), "DIR")


# --- the in-domain zero-shot set: CLDR emoji group of the held-out emoji -----------------------
EMOJI_GROUPS = ["smileys and emotion", "people and body", "animals and nature", "food and drink",
                "travel and places", "activities", "objects", "symbols", "flags"]
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")


def test_emoji_group_of_known_emoji():
    from openclip_align.data.sources import emoji_group as eg

    expected = {"\U0001F600": "Smileys & Emotion",                  # grinning face
                "\U0001F1EF\U0001F1F5": "Flags",                    # flag: Japan
                "\U0001F34E": "Food & Drink",                       # red apple
                "\u2764\ufe0f": "Smileys & Emotion",                # red heart, with its variation selector ...
                "\u2764": "Smileys & Emotion",                      # ... and without
                "\U0001F415": "Animals & Nature",                   # dog
                "\u26BD": "Activities",                             # soccer ball
                "\U0001F469\u200D\U0001F4BB": "People & Body",      # woman technologist
                "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F": "Flags"}   # Scotland
    for s, group in expected.items():
        assert eg.group_of(s) == (group, "exact"), s
    # Emoji 15.1 sequences (drawn by the font, newer than Debian's emoji-test 15.0): the group of their base
    assert eg.group_of("\U0001F426\u200D\U0001F525") == ("Animals & Nature", "zwj-prefix")      # phoenix
    assert eg.group_of("\U0001F34B\u200D\U0001F7E9") == ("Food & Drink", "zwj-prefix")          # lime
    assert eg.group_of("\U0001F642\u200D\u2194\ufe0f") == ("Smileys & Emotion", "zwj-prefix")   # head shaking
    assert eg.group_of("\U0001F3FB") == eg.group_of("\U0001F9B0") == ("Component", "exact")   # skin tone, red hair
    assert eg.group_of("A") == (None, "none")
    rows, how = eg.label_rows([("a.png", "\U0001F600"), ("b.png", "\U0001F44D\U0001F3FD"), ("c.png", "\U0001F9B0"),
                               ("d.png", "\U0001F1EF\U0001F1F5"), ("e.png", "A")])
    assert rows == [("a.png", 0), ("d.png", 8)]            # skin-tone variants, components, unknowns left out
    assert how == {"exact": 2, "zwj_prefix": 0, "skin_tone_variants": 1, "without_group": 1, "component": 1}
    assert eg.CLASSNAMES == EMOJI_GROUPS


def test_parse_emoji_test_text():
    from openclip_align.data.sources import emoji_group as eg

    text = ("# Version: 99.0\n\n# group: Component\n# subgroup: skin-tone\n"
            "1F3FB ; component # x E1.0 light skin tone\n\n# group: Symbols\n# subgroup: heart\n"
            "2764 FE0F ; fully-qualified # x E0.6 red heart\n2764 ; unqualified # x E0.6 red heart\n#EOF\n")
    groups, subgroups, version = eg.parse_emoji_test(text)
    assert groups == {"1F3FB": "Component", "2764": "Symbols"} and subgroups["2764"] == "heart" and version == "99.0"
    with pytest.raises(ValueError, match="Emoticons"):
        eg.parse_emoji_test("# group: Emoticons\n1F600 ; fully-qualified # x grinning face\n")


def _normalised(name):
    return " ".join(re.sub(r"[:,]", " ", name.lower()).split())


def _groups_by_name():
    """CLDR name -> group, read from the comments of emoji-test.txt (not from the builder's code point table)."""
    out, group = {}, None
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip().lower().replace(" & ", " and ")
        elif "; fully-qualified" in line:
            name = re.match(r".*# \S+ E\d+\.\d+ (.*)$", line).group(1)
            out[_normalised(name)] = group
    return out


def test_emoji_group_zero_shot_set(corpus):
    out, manifest = corpus
    spec = json.loads((out / "zeroshot" / "emoji_group.json").read_text())
    assert set(spec) == {"classnames", "templates"} and spec["classnames"] == EMOJI_GROUPS
    assert len(spec["templates"]) >= 3 and all("{}" in t for t in spec["templates"])
    df = _csv(out / "zeroshot" / "emoji_group.csv")
    assert list(df.columns) == ["filepath", "label"] and df["label"].dtype.kind == "i"
    counts = np.bincount(df["label"], minlength=len(EMOJI_GROUPS))
    assert len(counts) == len(EMOJI_GROUPS) and counts.min() > 0      # labels index classnames; every group present
    assert counts.max() < 0.3 * len(df)                                 # no group swamps the set

    # only held-out emoji, never a training image; every held-out emoji but the skin-tone variants
    held, train = _csv(out / "heldout.csv"), _csv(out / "train.csv")
    assert not set(df["filepath"]) & set(train["filepath"])
    wanted = held[(held["source"] == "emoji") & ~held["title"].str.contains("skin tone")]
    assert df["filepath"].tolist() == wanted["filepath"].tolist()    # held-out order, one row per image
    assert len(df) > 200

    # labels agree with the groups emoji-test.txt gives the emoji's names
    label_of = dict(zip(df["filepath"], df["label"]))
    by_name = _groups_by_name()
    matched = [(t, by_name[_normalised(t)], EMOJI_GROUPS[label_of[p]])
               for p, t in zip(wanted["filepath"], wanted["title"]) if _normalised(t) in by_name]
    assert len(matched) >= 0.9 * len(df)
    assert [m for m in matched if m[1] != m[2]] == []
    titles = dict(zip(wanted["title"], (EMOJI_GROUPS[label_of[p]] for p in wanted["filepath"])))
    known = {"face with tears of joy": "smileys and emotion", "wolf": "animals and nature", "banana": "food and drink",
             "flag Togo": "flags", "racing car": "travel and places", "tennis": "activities", "wrench": "objects",
             "Virgo": "symbols", "baby": "people and body", "head shaking horizontally": "smileys and emotion"}
    hits = {t: titles[t] for t in known if t in titles}
    assert len(hits) >= 5 and hits == {t: known[t] for t in hits}

    z = manifest["zeroshot"]["emoji_group"]
    assert manifest["counts"]["zeroshot"]["emoji_group"] == z["n"] == len(df) and z["per_class"] == counts.tolist()
    info = manifest["sources"]["emoji_group"]
    assert info["role"] == "zeroshot" and info["packages"]["unicode-data"]["registry"] == "debian"
    assert info["counts"]["heldout_emoji_skin_tone_variants"] == (held["title"].str.contains("skin tone")
                                                                   & (held["source"] == "emoji")).sum() > 0


def test_emoji_group_requirement_listed():
    from openclip_align.data.build import SIZES, requirements_for

    for size in ("small", "full"):
        apt = [r.name for r in requirements_for(SIZES[size], None) if r.kind == "apt"]
        assert "unicode-data" in apt


def _without_emoji_group(manifest):
    m = json.loads(json.dumps(manifest))
    for part in (m["zeroshot"], m["counts"]["zeroshot"], m["sources"], m["packages"]):
        part.pop("emoji_group", None)
    m["packages"].pop("unicode-data")
    return m


def test_add_emoji_group_to_an_older_corpus(corpus, tmp_path, monkeypatch):
    """An existing corpus gets the same files and manifest entries as a fresh build, without a rebuild."""
    import dataclasses

    from openclip_align.data import build
    from openclip_align.data.packages import MissingPackageError

    import shutil

    out, manifest = corpus
    older = tmp_path / "older"              # the whole corpus (the manifest's content hash covers every pair) ...
    shutil.copytree(out, older, symlinks=True)
    for name in ("emoji_group.csv", "emoji_group.json"):                # ... as it was before the emoji group
        (older / "zeroshot" / name).unlink()
    (older / "manifest.json").write_text(json.dumps(_without_emoji_group(manifest)))
    updated = build.add_emoji_group(older, install=False)
    assert updated == json.loads((older / "manifest.json").read_text())
    assert updated == manifest
    for name in ("emoji_group.csv", "emoji_group.json"):
        assert (older / "zeroshot" / name).read_bytes() == (out / "zeroshot" / name).read_bytes()

    missing = dataclasses.replace(build.emoji_group_source.REQUIREMENTS[0], provides=str(tmp_path / "no-such-file"))
    monkeypatch.setattr(build.emoji_group_source, "REQUIREMENTS", (missing,))
    with pytest.raises(MissingPackageError, match="apt-get install -y --no-install-recommends unicode-data"):
        build.add_emoji_group(older, install=False)
    assert (older / "manifest.json").exists()                # nothing touched when a package is missing


def test_benchmark_evaluates_the_emoji_group_set(corpus, tmp_path):
    import open_clip
    import torch

    from openclip_align.experiments.scoring import evaluate_model

    out, _ = corpus
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model("DualCLIP-Tiny").state_dict()}, checkpoint)
    metrics = evaluate_model("DualCLIP-Tiny", checkpoint, out)
    for name in ("fashion_mnist", "digits", "emoji_group"):
        assert 0.0 <= metrics[f"zeroshot_{name}_top1"] <= 1.0


def test_build_writes_the_clip_benchmark_sets(corpus):
    """The build writes clip_benchmark/ for every evaluation set; add-clip-benchmark on the finished corpus
    rewrites exactly the same bytes and manifest entry (tests/test_clip_benchmark.py runs CLIP_benchmark)."""
    from openclip_align.data.clip_benchmark_sets import add_clip_benchmark

    out, manifest = corpus
    entry = manifest["clip_benchmark"]
    assert entry["retrieval"]["heldout"]["n"] == manifest["counts"]["heldout"]
    assert {name: s["n"] for name, s in entry["zeroshot"].items()} == manifest["counts"]["zeroshot"]
    annotations = json.loads((out / "clip_benchmark/mscoco_captions/coco_test_karpathy.json").read_text())
    heldout = _csv(out / "heldout.csv")
    root = out / "clip_benchmark/mscoco_captions/val2014"
    assert [os.path.normpath(root / im["file_name"]) for im in annotations["images"]] == heldout["filepath"].tolist()
    assert [a["caption"] for a in annotations["annotations"]] == heldout["title"].tolist()
    before = {p: p.read_bytes() for p in (out / "clip_benchmark").rglob("*") if p.is_file()}
    assert add_clip_benchmark(out) == manifest
    assert {p: p.read_bytes() for p in (out / "clip_benchmark").rglob("*") if p.is_file()} == before
