"""CLIP-Refine through `python -m open_clip_train.main --loss refine --pretrained CKPT` (issue 6)."""
import hashlib

import open_clip
import pytest
import torch

from conftest import write_digits_corpus
from test_trainer import base, logged, train

MODEL = "DualCLIP-Tiny"
REFINE_LR = 1e-5
STEPS_PER_EPOCH = 1200 // 64            # open_clip_train drops the last partial batch


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly trained dual-tower CLIP on real digit scans (about 70 % zero-shot): the model a user refines."""
    root = tmp_path_factory.mktemp("refine")
    corpus = write_digits_corpus(root / "corpus", n_train=1200, n_heldout=160)
    train(["--model", MODEL, "--train-data", str(corpus / "train.csv"), *base(batch_size=64, lr=5e-4),
           "--warmup", "20", "--epochs", "10", "--save-frequency", "10"], root, "clip")
    return corpus, root / "clip" / "checkpoints" / "epoch_10.pt"


def refine_argv(corpus, checkpoint, lr=REFINE_LR):
    return ["--model", MODEL, "--loss", "refine", "--pretrained", str(checkpoint),
            "--train-data", str(corpus / "train.csv"), *base(batch_size=64, lr=lr),
            "--lr-scheduler", "const", "--warmup", "0"]


def record(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer"]["openclip_align"]


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def fingerprint_of(checkpoint):
    from openclip_align.integration.trainer_run import state_fingerprint

    return state_fingerprint(open_clip.create_model(MODEL, pretrained=str(checkpoint)))


@pytest.fixture(scope="module")
def refined(pretrained, tmp_path_factory):
    """One refine epoch, then a resume to a second one (the same --pretrained, as a user would rerun it)."""
    corpus, start = pretrained
    logs = tmp_path_factory.mktemp("refine-runs")
    train([*refine_argv(corpus, start), "--epochs", "1"], logs, "refine")
    train([*refine_argv(corpus, start), "--epochs", "2", "--resume", "latest"], logs, "refine")
    return corpus, start, logs / "refine"


@pytest.fixture(scope="module")
def before_after(refined):
    from openclip_align.benchmark.evaluate import evaluate_model

    corpus, start, run = refined
    return (evaluate_model(MODEL, start, corpus),
            evaluate_model(MODEL, run / "checkpoints" / "epoch_1.pt", corpus))


def test_one_refine_epoch_keeps_zero_shot_accuracy(before_after):
    before, after = before_after
    assert before["zeroshot_digits_top1"] > 0.5        # the starting model has something to lose
    assert after["zeroshot_digits_top1"] >= before["zeroshot_digits_top1"] - 0.05
    assert after["centroid_gap"] != before["centroid_gap"]          # the epoch did change the model


@pytest.mark.xfail(reason="CLIP-Refine widens the gap of scratch-trained Tiny models (0.69 -> 0.71 here), and with "
                          "the authors' recipe leaves the pretrained-tower CLIP's gap unchanged (0.158 -> 0.160, "
                          "make benchmark); the published shrinkage is for OpenAI CLIP. See docs/notes.md",
                   strict=False)
def test_one_refine_epoch_shrinks_the_centroid_gap(before_after):
    before, after = before_after
    assert after["centroid_gap"] < before["centroid_gap"]


def test_resume_rebuilds_the_original_teacher(refined):
    corpus, start, run = refined
    first, second = record(run / "checkpoints" / "epoch_1.pt"), record(run / "checkpoints" / "epoch_2.pt")
    original = fingerprint_of(start)
    # the checkpoint names the teacher it was refined against: the starting model, also after the resume
    assert first["teacher_sha256"] == second["teacher_sha256"] == original
    assert fingerprint_of(run / "checkpoints" / "epoch_1.pt") != original      # not the partly refined model
    # the teacher is not saved into checkpoints: the state dict holds the student alone
    state = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == set(open_clip.create_model(MODEL).state_dict())
    # RaFA's reference sequence continues across the resume instead of restarting
    assert int(first["state"]["rafa.draws"]) == STEPS_PER_EPOCH
    assert int(second["state"]["rafa.draws"]) == 2 * STEPS_PER_EPOCH


def test_resume_with_another_teacher_is_refused(refined, tmp_path):
    corpus, start, run = refined
    checkpoints = run / "checkpoints"
    before = digests(checkpoints)
    partly_refined = checkpoints / "epoch_1.pt"
    out = train([*refine_argv(corpus, partly_refined), "--epochs", "3", "--resume", str(checkpoints / "epoch_2.pt")],
                tmp_path, "other", check=False)
    assert out.returncode != 0
    assert "the teacher (the model before refinement) differs" in out.stdout + out.stderr
    assert digests(checkpoints) == before                                  # nothing written, nothing overwritten


def test_accum_freq_gives_the_same_refinement(pretrained, tmp_path):
    """Steps of batch 64 and of 2 x 32 with --accum-freq 2: the same HyCD targets and the same RaFA reference
    (drawn once per optimizer step, not per accumulation call), hence the same loss values."""
    corpus, start = pretrained
    common = [*refine_argv(corpus, start, lr=1e-4), "--epochs", "1", "--train-data", str(corpus / "heldout.csv")]
    train(common, tmp_path, "whole")
    train([*common, "--batch-size", "32", "--accum-freq", "2"], tmp_path, "accum")
    for term in ("Hycd_loss", "Rafa_loss"):
        whole, accum = logged(tmp_path / "whole" / "out.log", term), logged(tmp_path / "accum" / "out.log", term)
        assert len(whole) == len(accum) == 160 // 64, (term, whole, accum)
        assert whole == pytest.approx(accum, rel=1e-4), term


def test_refine_without_a_trained_model_is_refused(pretrained, tmp_path):
    corpus, _ = pretrained
    argv = [a for a in refine_argv(corpus, "unused") if a not in ("--pretrained", "unused")]
    out = train([*argv, "--epochs", "1"], tmp_path, "refine", check=False)
    assert out.returncode != 0 and "pass --pretrained" in out.stderr
    assert not (tmp_path / "refine" / "checkpoints").exists()
