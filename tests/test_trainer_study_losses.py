"""The course-study losses and optimizers through `python -m open_clip_train.main` (issue 7)."""
import math
from pathlib import Path

import pytest
import torch

from _trainer_launch import base, logged, train

# every loss and every optimizer at least once, in four runs
RUNS = [("sogclr", "adamw", "AdamW (adamw)", ["Sogclr_image_loss", "Sogclr_text_loss"]),
        ("cyclip", "adam", "Adam (timm/adam)", ["Contrastive_loss", "Cyclip_inmodal_loss", "Cyclip_crossmodal_loss"]),
        ("vicreg", "sgd", "SGD (timm/momentum)", ["Vicreg_sim_loss", "Vicreg_var_loss", "Vicreg_cov_loss"]),
        ("onlineclr", "sgd", "SGD (timm/momentum)", ["Onlineclr_neg_loss", "Onlineclr_pos_loss"])]


@pytest.mark.parametrize("loss,opt,created,terms", RUNS, ids=[f"{r[0]}-{r[1]}" for r in RUNS])
def test_loss_and_optimizer_train_through_the_upstream_trainer(digits_csv, tmp_path, loss, opt, created, terms):
    lr = 1e-2 if opt == "sgd" else 5e-4
    train(["--model", "DualCLIP-Tiny", "--loss", loss, "--opt", opt, "--train-data", str(digits_csv),
           *base(lr=lr), "--epochs", "1"], tmp_path, "run")
    out_log = (tmp_path / "run" / "out.log").read_text()
    assert f"Created {created} optimizer" in out_log
    if opt == "sgd":      # plain momentum SGD, as in the study (timm's "sgd" would be Nesterov)
        assert "momentum: 0.9," in out_log and "nesterov: False" in out_log
    for term in terms:    # 48 rows / batch 16 = 3 steps, each logging every term of the loss's breakdown
        values = logged(tmp_path / "run" / "out.log", term)
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (term, values)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert checkpoint["optimizer"]["openclip_align"]["loss"] == loss


# One batch of all 48 rows per epoch: the batch's order is the only thing the sampler changes, and every
# loss here is a sum over the pairs, so an uninterrupted and a resumed run see the same steps. Crops are
# full images (scale 1) so augmentation draws from the RNG change nothing either.
def resume_argv(loss, csv):
    return ["--model", "DualCLIP-Tiny", "--loss", loss, "--train-data", str(csv), *base(batch_size=48, lr=2e-3),
            "--lr-scheduler", "const", "--aug-cfg", "scale=(1.0,1.0)"]


def loss_state(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["optimizer"]["openclip_align"]["state"], checkpoint["state_dict"]


@pytest.mark.parametrize("loss,term", [("sogclr", "Sogclr_image_loss"), ("onlineclr", "Onlineclr_neg_loss")])
def test_state_survives_resume_exactly(digits_csv, tmp_path, loss, term):
    argv = resume_argv(loss, digits_csv)
    train([*argv, "--epochs", "3"], tmp_path, "straight")
    # resumed from the uninterrupted run's own epoch-1 checkpoint (a constant lr: a 1-epoch run writes the same)
    first = tmp_path / "straight" / "checkpoints" / "epoch_1.pt"
    train([*argv, "--epochs", "3", "--resume", str(first)], tmp_path, "resumed")

    straight = logged(tmp_path / "straight" / "out.log", term)
    resumed = logged(tmp_path / "resumed" / "out.log", term)
    assert len(straight) == 3 and len(resumed) == 2
    assert resumed == pytest.approx(straight[1:], rel=1e-4, abs=1e-6)

    state_straight, weights_straight = loss_state(tmp_path / "straight" / "checkpoints" / "epoch_3.pt")
    state_resumed, weights_resumed = loss_state(tmp_path / "resumed" / "checkpoints" / "epoch_3.pt")
    assert state_straight.keys() == state_resumed.keys()
    # a fresh process shuffles the one batch's rows into another order, so sums differ in the last bits
    for key in state_straight:
        assert torch.allclose(state_straight[key].float(), state_resumed[key].float(), rtol=1e-4, atol=1e-5), key
    # compared as a whole: Adam turns the ~zero gradients of attention key biases (softmax ignores them) into
    # lr-sized steps of arbitrary sign, so those few entries differ by last-bit noise times lr
    difference = torch.cat([(weights_straight[k] - weights_resumed[k]).flatten() for k in weights_straight])
    scale = torch.cat([weights_straight[k].flatten() for k in weights_straight])
    assert float(difference.norm() / scale.norm()) < 1e-4

    # the check has teeth: the state after epoch 1 is not the initial one, so a resume that dropped it would
    # start epoch 2 from a different normaliser
    state_first, _ = loss_state(first)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in state_first.values())
    if loss == "sogclr":
        assert bool(state_first["visited"].all())          # every one of the 48 indices was seen in epoch 1


def test_sogclr_refuses_shards_without_an_index(digits_csv, tmp_path):
    """A webdataset sample has no stable index unless the shards carry one (KEY.json or a column's numbering):
    a clear error at the first sample, and no checkpoint."""
    import pandas as pd
    import webdataset as wds

    rows = pd.read_csv(digits_csv, sep="\t")
    with wds.TarWriter(str(tmp_path / "bare-000000.tar")) as sink:
        for i in range(32):
            sink.write({"__key__": f"{i:09d}", "png": Path(rows.filepath[i]).read_bytes(), "txt": rows.title[i]})
    (tmp_path / "sizes.json").write_text('{"bare-000000.tar": 32}')     # the size is known; the index is not
    out = train(["--model", "DualCLIP-Tiny", "--loss", "sogclr", "--train-data", str(tmp_path / "bare-000000.tar"),
                 "--train-num-samples", "32", *base(dataset_type="webdataset"), "--epochs", "1"],
                tmp_path, "run", check=False)
    assert out.returncode != 0
    assert "needs a per-pair dataset index" in out.stderr and "KEY.json" in out.stderr, out.stderr[-1200:]
    assert not (tmp_path / "run" / "checkpoints" / "epoch_1.pt").exists()
