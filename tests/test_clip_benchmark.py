"""`clip_benchmark eval` on the plugin's models and the corpus's CLIP_benchmark layouts (issue 17).

CLIP_benchmark runs in a fresh process (its CLI): the plugin's models resolve there because the .pth file
activates it at start-up (the ``add_model_config``-in-a-script approach cannot reach that process).
Its recall and zero-shot accuracy must agree with the project's own numbers on the same checkpoint and
the same pairs.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from PIL import Image

from _trainer_launch import base, train_here
from conftest import write_digits_corpus
from openclip_align.data.clip_benchmark_sets import add_clip_benchmark, write_clip_benchmark_sets
from openclip_align.evaluation import CsvImages, embed_images, embed_pairs, retrieval_recall, zero_shot_accuracy
from openclip_align.evaluation.zero_shot import load_classnames, zero_shot_classifier


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Digits corpus whose held-out captions are unique (a scan number), so retrieval has no ties;
    ``clip_benchmark/`` written as a build writes it."""
    directory = write_digits_corpus(tmp_path_factory.mktemp("cb_corpus"), n_train=48, n_heldout=64)
    lines = (directory / "heldout.csv").read_text().splitlines()
    (directory / "heldout.csv").write_text("\n".join(
        [lines[0]] + [f"{line}, scan {row}" for row, line in enumerate(lines[1:])]) + "\n")
    add_parity_set(directory)
    write_clip_benchmark_sets(directory)
    return directory


def add_parity_set(directory):
    """A second zero-shot set of the same scans with 2 classes, so CLIP_benchmark's accuracy step also takes
    its fewer-than-5-classes branch (top-1 only, top-5 reported as NaN)."""
    rows = (directory / "zeroshot" / "digits.csv").read_text().splitlines()
    parity = [rows[0]] + [f"{path}\t{int(label) % 2}" for path, label in (row.split("\t") for row in rows[1:])]
    (directory / "zeroshot" / "parity.csv").write_text("\n".join(parity) + "\n")
    (directory / "zeroshot" / "parity.json").write_text(json.dumps(
        {"classnames": ["even", "odd"], "templates": ["an {} digit", "a handwritten {} number"]}))


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    """AlignCLIP-Tiny (the plugin's SharedCLIP) and DualCLIP-Tiny (upstream's CLIP), 3 steps each."""
    logs = tmp_path_factory.mktemp("cb_logs")
    out = {}
    for name in ("AlignCLIP-Tiny", "DualCLIP-Tiny"):
        # upstream's main in this process (the CLI runs below are the fresh processes this file is about)
        assert train_here(["--model", name, "--train-data", str(corpus / "train.csv"), "--epochs", "1", *base()], logs,
                          name) is None
        out[name] = logs / name / "checkpoints" / "epoch_1.pt"
    return out


def clip_benchmark_eval(model, checkpoint, corpus, out_dir):
    """``clip_benchmark eval`` of the held-out retrieval set, in a fresh process (its CLI)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    cli = Path(sys.executable).with_name("clip_benchmark")
    cmd = [str(cli) if cli.exists() else "clip_benchmark", "eval", "--model", model, "--pretrained", str(checkpoint),
           "--dataset", "mscoco_captions", "--dataset_root", f"{corpus}/clip_benchmark/{{dataset}}",
           "--recall_k", "1", "5", "--no_amp", "--num_workers", "0", "--batch_size", "16",
           "--output", f"{out_dir}/{{dataset}}.json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=out_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Downloading" not in done.stdout                           # everything was found offline
    return json.loads((out_dir / "mscoco_captions.json").read_text())["metrics"]


@pytest.mark.parametrize("model", ["AlignCLIP-Tiny", "DualCLIP-Tiny"])
def test_clip_benchmark_recall_agrees_with_the_project(model, corpus, checkpoints, tmp_path):
    theirs = clip_benchmark_eval(model, checkpoints[model], corpus, tmp_path)

    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(checkpoints[model]))
    image, text = embed_pairs(net, preprocess, open_clip.get_tokenizer(model), str(corpus / "heldout.csv"),
                              progress=False)
    ours = retrieval_recall(image, text, ks=(1, 5))
    for k in (1, 5):   # CLIP_benchmark: "image retrieval" = text queries; "text retrieval" = image queries
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_R@{k}"])
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_R@{k}"])
    assert 0 < ours["image_to_text_R@5"] < 1                            # not a degenerate case


def test_clip_benchmark_zero_shot_cli_agrees_with_the_project(corpus, checkpoints, tmp_path):
    """``clip_benchmark eval --task zeroshot_classification`` (its CLI, a fresh process) on every zero-shot set
    of the corpus, against the project's zero-shot accuracy on the same checkpoint and images. Its accuracy
    step needs NumPy < 2.4 (the dev extra's bound, docs/notes.md)."""
    model = "AlignCLIP-Tiny"
    sets = sorted(path.stem for path in (corpus / "zeroshot").glob("*.json"))
    assert sets == ["digits", "parity"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    cli = Path(sys.executable).with_name("clip_benchmark")
    cmd = [str(cli) if cli.exists() else "clip_benchmark", "eval", "--task", "zeroshot_classification",
           "--model", model, "--pretrained", str(checkpoints[model]), "--dataset", *[f"wds/{s}" for s in sets],
           "--dataset_root", f"{corpus}/clip_benchmark/{{dataset}}", "--no_amp", "--num_workers", "0",
           "--batch_size", "16", "--output", f"{tmp_path}/{{dataset}}.json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(checkpoints[model]))
    tokenizer = open_clip.get_tokenizer(model)
    for name in sets:
        theirs = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
        classnames, templates = load_classnames(corpus / "zeroshot" / f"{name}.json")
        features, labels = embed_images(net, preprocess, CsvImages(corpus / "zeroshot" / f"{name}.csv"),
                                        progress=False)
        ours = zero_shot_accuracy(features, zero_shot_classifier(net, tokenizer, classnames, templates), labels)
        assert theirs["acc1"] == pytest.approx(ours["top1"]), name
        assert 0 < ours["top1"] < 1, name                                   # not a degenerate case
        if len(classnames) >= 5:
            assert theirs["acc5"] == pytest.approx(ours["top5"]), name
        else:
            assert theirs["acc5"] is None or math.isnan(theirs["acc5"])     # CLIP_benchmark: top-5 needs 5 classes


def test_layouts_are_what_clip_benchmark_reads(corpus):
    """Read back with CLIP_benchmark's own dataset builder (no model): every pair and class, in order."""
    from clip_benchmark.datasets.builder import build_dataset

    pairs = build_dataset("mscoco_captions", root=str(corpus / "clip_benchmark" / "mscoco_captions"),
                          split="test", task="zeroshot_retrieval", download=False)
    rows = [line.split("\t") for line in (corpus / "heldout.csv").read_text().splitlines()[1:]]
    assert len(pairs) == len(rows) == 64
    for i in (0, 17, 63):
        image, captions = pairs[i]
        assert captions == [rows[i][1]]
        assert list(image.getdata()) == list(Image.open(rows[i][0]).convert("RGB").getdata())

    digits = build_dataset("wds/digits", root=str(corpus / "clip_benchmark" / "digits"), split="test")
    assert digits.classes == json.loads((corpus / "zeroshot" / "digits.json").read_text())["classnames"]
    assert digits.templates == ["a handwritten digit {c}", "the numeral {c}"]
    labels = [int(line.split("\t")[1]) for line in (corpus / "zeroshot" / "digits.csv").read_text().splitlines()[1:]]
    assert [int(label) for _, label in digits] == labels


def test_add_clip_benchmark_to_an_existing_corpus(corpus, tmp_path):
    """An existing corpus gets the same files as a build writes, and a manifest entry; a folder without a
    manifest is refused and left as it was."""
    import shutil

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy, ignore=shutil.ignore_patterns("clip_benchmark"))   # rows still point at corpus
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        add_clip_benchmark(copy)
    assert not (copy / "clip_benchmark").exists()
    (copy / "manifest.json").write_text(json.dumps({"format": "openclip-align-corpus"}))
    stale = copy / "clip_benchmark" / "a_removed_set" / "classnames.txt"       # from an earlier corpus state
    stale.parent.mkdir(parents=True)
    stale.write_text("x\n")
    manifest = add_clip_benchmark(copy)
    assert not stale.parent.exists()
    assert manifest == json.loads((copy / "manifest.json").read_text())
    assert manifest["clip_benchmark"]["zeroshot"]["digits"]["n"] == 64
    assert manifest["clip_benchmark"]["retrieval"]["heldout"]["n"] == 64
    assert "--dataset mscoco_captions --dataset_root 'DIR/clip_benchmark/{dataset}'" in \
        manifest["clip_benchmark"]["command"]
    # the zero-shot shard holds the same bytes; the annotations differ only by where the images are
    assert (copy / "clip_benchmark/digits/test/0.tar").read_bytes() == \
        (corpus / "clip_benchmark/digits/test/0.tar").read_bytes()
    ours = json.loads((copy / "clip_benchmark/mscoco_captions/coco_test_karpathy.json").read_text())
    root = copy / "clip_benchmark/mscoco_captions/val2014"
    assert [os.path.normpath(root / im["file_name"]) for im in ours["images"]] == \
        [line.split("\t")[0] for line in (corpus / "heldout.csv").read_text().splitlines()[1:]]
