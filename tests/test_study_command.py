"""`openclip-align study`: a losses x optimizers grid through the upstream trainer (issue 7, item 4)."""
import json

import numpy as np
import pytest
import torch

from conftest import write_digits_corpus
from openclip_align.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_digits_corpus(tmp_path_factory.mktemp("study_corpus"), n_train=64, n_heldout=40)


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    """2 x 2 grid; SGD gets an infinite learning rate so its runs must come out as diverged."""
    out = tmp_path_factory.mktemp("study_out")
    code = main(["study", "--regime", "scratch", "--data", str(corpus), "--out", str(out), "--losses", "clip", "sogclr",
                 "--optimizers", "adamw", "sgd", "--epochs", "1", "--batch-size", "16", "--lr", "sgd=inf"])
    return code, out, json.loads((out / "results.json").read_text())


def test_grid_has_every_cell_and_diverged_runs_are_reported(study):
    code, out, results = study
    assert code == 0
    assert results["plan"]["regime"] == "scratch" and results["plan"]["model"] == "DualCLIP-Tiny"
    status = {(c["loss"], c["optimizer"]): c["status"] for c in results["cells"]}
    assert status == {("clip", "adamw"): "ok", ("sogclr", "adamw"): "ok",
                      ("clip", "sgd"): "diverged", ("sogclr", "sgd"): "diverged"}
    table = (out / "results.md").read_text()
    assert "| clip | sgd | diverged |" in table and "| sogclr | sgd | diverged |" in table
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_are_probabilities_and_the_average_is_their_mean(study):
    _, _, results = study
    for cell in results["cells"]:
        if cell["status"] != "ok":
            continue
        parts = [cell["image_to_text_R@1"], cell["text_to_image_R@1"], cell["zeroshot_top1"]]
        assert all(0.0 <= p <= 1.0 for p in parts)
        assert cell["average"] == pytest.approx(sum(parts) / 3)
        assert 0.0 <= cell["centroid_gap"] <= 2.0
        assert results["table"][cell["loss"]][cell["optimizer"]]["average"]["mean"] == pytest.approx(cell["average"])


def test_columns_match_a_direct_computation(study, corpus):
    """Centroid gap and image->text R@1 of one cell recomputed from its checkpoint with plain torch."""
    import open_clip
    import pandas as pd
    from PIL import Image

    _, out, results = study
    cell = next(c for c in results["cells"] if c["loss"] == "clip" and c["optimizer"] == "adamw")
    checkpoint = out / "runs" / "clip-adamw-seed0" / "checkpoints" / "epoch_1.pt"
    model, _, preprocess = open_clip.create_model_and_transforms("DualCLIP-Tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("DualCLIP-Tiny")
    frame = pd.read_csv(corpus / "heldout.csv", sep="\t")
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in frame["filepath"]])
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(tokenizer(frame["title"].tolist()), normalize=True)
    similarity = (image.double() @ text.double().T).numpy()
    # a hit: the paired caption scores strictly above every other caption (an identical duplicate is a miss)
    others = similarity.copy()
    np.fill_diagonal(others, -np.inf)
    direct = float(np.mean(np.diag(similarity) > others.max(axis=1)))
    assert cell["image_to_text_R@1"] == pytest.approx(direct, abs=1.5 / len(frame))
    gap = torch.linalg.vector_norm(image.double().mean(0) - text.double().mean(0)).item()
    assert cell["centroid_gap"] == pytest.approx(gap, rel=1e-3)


def test_the_default_regime_is_the_pretrained_towers_with_locks():
    from openclip_align.experiments.regimes import PRETRAINED_LOCKS, REGIMES
    from openclip_align.experiments.grid_study import StudyPlan
    from openclip_align.cli import build_parser

    assert build_parser().parse_args(["study"]).regime == "pretrained"
    plan = StudyPlan()
    assert plan.model == REGIMES["pretrained"].model == "DualCLIP-Lite0-MiniLM"
    assert plan.extra == PRETRAINED_LOCKS and "--lock-image" in plan.extra and "--lock-text" in plan.extra


def test_bad_arguments_are_clear(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--lr names optimizers"):
        main(["study", "--regime", "scratch", "--data", str(corpus), "--out", str(tmp_path), "--lr", "lamb=0.1"])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["study", "--regime", "scratch", "--data", str(corpus), "--out", str(tmp_path), "--model", "NoSuchCLIP"])
    with pytest.raises(SystemExit):
        main(["study", "--regime", "scratch", "--data", str(corpus), "--out", str(tmp_path), "--lr", "sgd"])
    assert "expected OPTIMIZER=LR" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has no train.csv or heldout.csv.*make data"):
        main(["study", "--regime", "scratch", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])

