"""`torchrun --nproc_per_node 2 -m open_clip_train.main --device cpu` with the plugin: 2 ranks = 1 rank (issue 15).

Every run here is a real ``open_clip_train.main`` (upstream's loop, DDP over gloo, the plugin's losses).
The 2-rank runs read the csv through upstream's ``DistributedSampler``; the 1-rank reference with twice
the batch reads, by tests/_trainer_harness.py, the same global batches in the same order as the losses
gather them (rank 0's rows first; with ``--accum-freq 2``, rank 0's two batches first). Images are not augmented (``--aug-cfg scale=(1.0,1.0)``: the crop is always the whole image), so
both see identical inputs. The optimizer is SGD with momentum and no weight decay, whose update is linear
in the gradient: a gradient off by any factor moves the weights by that factor (Adam would hide it).

Expectations, from the convention in openclip_align/losses/distributed.py and upstream's ClipLoss:

* ``--gather-with-grad`` (with or without ``--local-loss``): the weight updates after K steps equal the
  1-rank ones; without ``--local-loss`` every rank's loss terms equal the 1-rank terms at each call,
  with it their mean over ranks does.
* no ``--gather-with-grad`` (and no ``--local-loss``): each rank's local rows get the 1-rank gradient of
  the loss and DDP averages over ranks, so the parameters behind the features get 1/2 of the 1-rank
  gradient, as with upstream's ClipLoss (the logit scale, used whole by every rank, gets all of it).
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trainer_launch import calls, run_ranks, torchrun_command, train  # noqa: E402
from conftest import write_digits_csv  # noqa: E402

N = 64                      # pairs: 4 steps of 2 x 8 (2 steps with --accum-freq 2)
LOCAL_B = 8
LR = 0.05
LOSSES = {                  # --loss: model, extra flags
    "clip": ("DualCLIP-Tiny", []),
    "imsep": ("AlignCLIP-Tiny", ["--semantic-source", "precomputed"]),
    "refine": ("DualCLIP-Tiny", []),
    "sogclr": ("DualCLIP-Tiny", []),
}


def common(batch, lr=LR):
    return ["--dataset-type", "csv", "--batch-size", str(batch), "--workers", "0", "--precision", "fp32",
            "--device", "cpu", "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1",
            "--aug-cfg", "scale=(1.0,1.0)", "--opt", "sgd", "--wd", "0", "--lr", str(lr)]


def weights(run: Path, epoch: int = 1):
    return torch.load(run / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=False)


def record_of(run: Path, epoch: int):
    """The plugin's record in a checkpoint (loss state, teacher fingerprint)."""
    return weights(run, epoch)["optimizer"]["openclip_align"]


def plain(state):
    """A state dict without DDP's ``module.`` prefix (a 2-rank checkpoint has it)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def update_error(run, reference, start, epoch=1):
    """max |update(run) - update(reference)| / max |update(reference)| over all tensors, and the latter."""
    got, want = plain(weights(run, epoch)["state_dict"]), plain(weights(reference, epoch)["state_dict"])
    start = plain(start)
    worst, scale = 0.0, 0.0
    for key, value in want.items():
        base = start[key].float()
        expected = value.float() - base
        worst = max(worst, (got[key].float() - base - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    return worst / scale, scale


def assert_same_terms(run, reference, local_loss=False, rel=1e-5, skip=0):
    """Loss terms of each call on both ranks of ``run`` against the 1-rank ``reference`` (from its call
    ``skip`` on): equal, or equal on average over the ranks under ``--local-loss``."""
    want = calls(reference)[skip:]
    ranks = [calls(run, r) for r in range(2)]
    assert want and all(len(r) == len(want) for r in ranks), (len(want), [len(r) for r in ranks])
    for step, expected in enumerate(want):
        for key, value in expected.items():
            values = [r[step][key] for r in ranks]
            got = [sum(values) / 2] if local_loss else values
            for g in got:
                assert g == pytest.approx(value, rel=rel, abs=rel * 1e-2), (step, key, values, value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """64 digit scans with row-aligned caption embeddings, and a starting checkpoint for each model."""
    import open_clip

    root = tmp_path_factory.mktemp("ddp")
    vectors = np.random.default_rng(0).standard_normal((N, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for folder, rows in (("one-step", 2 * LOCAL_B), ("data", N)):
        csv = write_digits_csv(root / folder, n=rows)
        np.save(csv.with_suffix(".emb.npy"), vectors[:rows])
    starts = {}
    for model_name in {m for m, _ in LOSSES.values()}:
        torch.manual_seed(0)
        model = open_clip.create_model(model_name)
        starts[model_name] = root / f"{model_name}.pt"
        torch.save(model.state_dict(), starts[model_name])
    return root, csv, starts


def loss_argv(setup, loss, *flags, batch=LOCAL_B, lr=LR):
    _, csv, starts = setup
    model, extra = LOSSES[loss]
    return ["--model", model, "--loss", loss, "--pretrained", str(starts[model]), "--train-data", str(csv),
            *extra, *common(batch, lr), "--epochs", "1", *flags]


@pytest.fixture(scope="module")
def references(setup):
    """The 1-rank runs (batch 16), per loss and --accum-freq."""
    root = setup[0]
    cache = {}

    def get(loss, accum=1):
        if (loss, accum) not in cache:
            cache[loss, accum] = run_ranks(loss_argv(setup, loss, "--accum-freq", str(accum), batch=2 * LOCAL_B),
                                           root / "ref", f"{loss}-accum{accum}", nproc=1)
        return cache[loss, accum]

    return get


def start_weights(setup, loss):
    return torch.load(setup[2][LOSSES[loss][0]], map_location="cpu")


@pytest.mark.parametrize("loss", [pytest.param(n, marks=[] if n == "sogclr" else [pytest.mark.slow]) for n in LOSSES])
def test_local_loss_gather_with_grad_two_ranks_equal_one(setup, references, loss, tmp_path):
    run = run_ranks(loss_argv(setup, loss, "--local-loss", "--gather-with-grad"), tmp_path, "ddp")
    reference = references(loss)
    assert_same_terms(run, reference, local_loss=True)
    error, scale = update_error(run, reference, start_weights(setup, loss))
    print(f"{loss} --local-loss --gather-with-grad: update error {error:.2e} of {scale:.2e}")
    assert scale > 1e-4 and error < 1e-5, (error, scale)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_gather_with_grad_and_accum_freq_two_ranks_equal_one(setup, references, loss, tmp_path):
    """Without --local-loss every rank computes the whole loss: each rank's terms equal the 1-rank ones;
    with --accum-freq 2 the loss runs twice per step on the accumulated (2 x 2 x 8) batch."""
    run = run_ranks(loss_argv(setup, loss, "--gather-with-grad", "--accum-freq", "2"), tmp_path, "ddp")
    reference = references(loss, accum=2)
    assert len(calls(reference)) == 4                  # 2 steps x 2 calls
    assert_same_terms(run, reference)
    error, scale = update_error(run, reference, start_weights(setup, loss))
    print(f"{loss} --gather-with-grad --accum-freq 2: update error {error:.2e} of {scale:.2e}")
    assert scale > 1e-4 and error < 1e-5, (error, scale)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_without_gather_with_grad_features_get_half_the_gradient_like_clip_loss(setup, loss, tmp_path):
    """Plain all_gather (upstream's default): every rank computes the whole loss, but only its own rows
    carry gradient, so DDP's average gives the parameters behind the features half the 1-rank gradient,
    while the logit scale, which every rank uses whole, gets all of it. One SGD step (its update is
    -lr x gradient) shows it for upstream's ClipLoss and each plugin loss alike."""
    root, _, _ = setup
    argv = loss_argv(setup, loss)
    argv[argv.index("--train-data") + 1] = str(root / "one-step" / "train.csv")       # 16 pairs: one step
    run = run_ranks(argv, tmp_path, "ddp")
    argv[argv.index("--batch-size") + 1] = str(2 * LOCAL_B)
    reference = run_ranks(argv, tmp_path, "one", nproc=1)
    assert len(calls(reference)) == 1
    assert_same_terms(run, reference)                   # each rank computes the whole loss
    start = plain(start_weights(setup, loss))
    got, want = plain(weights(run)["state_dict"]), plain(weights(reference)["state_dict"])
    worst, scale = 0.0, 0.0
    for key, value in want.items():
        full = value.float() - start[key].float()
        expected = full if key == "logit_scale" else full / 2
        worst = max(worst, (got[key].float() - start[key].float() - expected).abs().max().item())
        scale = max(scale, full.abs().max().item())
    print(f"{loss} without --gather-with-grad: error against half the 1-rank update {worst / scale:.2e} of {scale:.2e}")
    assert scale > 1e-4 and worst / scale < 1e-5, (worst, scale)
    if loss == "clip":   # the logit scale's exception is real: its update is whole, not halved
        moved = (want["logit_scale"] - start["logit_scale"]).abs().item()
        assert moved > 1e-3 and (got["logit_scale"] - want["logit_scale"]).abs().item() < 1e-5 * moved


@pytest.fixture(scope="module", params=["sogclr", "refine"])
def resumed(request, setup, tmp_path_factory):
    """Two epochs straight on 2 ranks ("2") and on 1 rank ("1"), and epoch 2 resumed from their epoch-1
    checkpoints: 2 ranks from 2, 1 rank from 2, 2 ranks from 1 (--local-loss --gather-with-grad)."""
    loss = request.param
    logs = tmp_path_factory.mktemp(f"resume-{loss}")

    def argv(batch, *flags):
        return loss_argv(setup, loss, "--local-loss", "--gather-with-grad", "--epochs", "2", *flags, batch=batch)

    runs = {"2": run_ranks(argv(LOCAL_B), logs, "two"), "1": run_ranks(argv(2 * LOCAL_B), logs, "one", nproc=1)}
    for name, nproc, source in (("2 from 2", 2, "2"), ("1 from 2", 1, "2"), ("2 from 1", 2, "1")):
        start = str(runs[source] / "checkpoints" / "epoch_1.pt")
        batch = LOCAL_B if nproc == 2 else 2 * LOCAL_B
        runs[name] = run_ranks(argv(batch, "--resume", start), logs, name.replace(" ", "-"), nproc=nproc)
    return loss, runs


def mean_terms(run: Path):
    """Each loss call's terms averaged over the ranks of ``run`` (under --local-loss: the 1-rank terms)."""
    ranks = [calls(run, r) for r in range(len(list((run / "record").glob("rank*.jsonl"))))]
    assert all(len(r) == len(ranks[0]) for r in ranks)
    return [{k: sum(r[i][k] for r in ranks) / len(ranks) for k in ranks[0][i]} for i in range(len(ranks[0]))]


@pytest.mark.slow
def test_resume_on_any_number_of_ranks_continues_the_run(setup, resumed):
    """Epoch 2 resumed from a checkpoint, on the same or the other number of ranks, is epoch 2 of the run
    that wrote the checkpoint: loss terms, weights and the plugin's record (SogCLR's per-sample state,
    CLIP-Refine's teacher fingerprint and RaFA draw count)."""
    import open_clip
    from openclip_align.integration.teacher import state_fingerprint

    loss, runs = resumed
    steps = N // (2 * LOCAL_B)
    model = LOSSES[loss][0]
    teacher = state_fingerprint(open_clip.create_model(model, pretrained=str(setup[2][model])))
    for name in ("2 from 2", "1 from 2", "2 from 1"):
        run, source = runs[name], runs[name[-1]]
        got_terms, want_terms = mean_terms(run), mean_terms(source)[steps:]     # a resumed run logs epoch 2
        assert len(got_terms) == len(want_terms) == steps, name
        for step, (got, want) in enumerate(zip(got_terms, want_terms)):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, step, key, got[key], value)
        error, scale = update_error(run, source, weights(source, 1)["state_dict"], epoch=2)     # epoch 2's update
        print(f"{loss} resumed {name}: epoch-2 update error {error:.2e} of {scale:.2e}")
        assert scale > 1e-4 and error < 1e-5, (name, error, scale)
        want, got = record_of(source, 2), record_of(run, 2)
        assert got.keys() == want.keys() and got["loss"] == loss
        assert got["state"].keys() == want["state"].keys()
        for key, value in want["state"].items():
            diff = (got["state"][key].double() - value.double()).abs().max().item()
            print(f"  state {key}: max difference {diff:.2e}")
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
        if loss == "refine":
            assert int(got["state"]["rafa.draws"]) == 2 * steps, name      # one reference draw per step
            assert got["teacher_sha256"] == teacher, name                   # the starting model, not a resumed one
    if loss == "sogclr":       # the compared state is not trivial: every pair visited, estimates moved
        state = record_of(runs["2"], 2)["state"]
        assert bool(state["visited"].all()) and bool((state["log_s_image"] != 0).all())


def torchrun_main(argv, cwd: Path):
    """The command line a user types: ``torchrun --nproc_per_node 2 -m open_clip_train.main ...``."""
    return train(argv, command=torchrun_command(nproc=2), nice=True, env={"OMP_NUM_THREADS": "1"}, cwd=cwd, check=False)


@pytest.mark.parametrize("loss", [
    "cyclip",
    pytest.param("vicreg", marks=pytest.mark.slow),
    pytest.param("onlineclr", marks=pytest.mark.slow),
])
def test_torchrun_command_line_trains_every_other_loss(setup, loss, tmp_path):
    """The remaining losses (clip, imsep, refine and sogclr run above) train on 2 ranks from the plain
    command line. --logs must follow `--` (torchrun's parser reads it as its own --logs-specs) or be
    spelled --log-root: cyclip runs the first form, the others the second."""
    _, csv, _ = setup
    argv = ["--model", "DualCLIP-Tiny", "--loss", loss, "--train-data", str(csv), *common(LOCAL_B, 5e-4),
            "--epochs", "1", "--name", "run"]
    if loss == "cyclip":
        refused = torchrun_main([*argv, "--logs", str(tmp_path / "logs")], tmp_path)
        assert refused.returncode != 0 and "ambiguous option: --logs could match --logs-specs" in refused.stderr
        out = torchrun_main(["--", *argv, "--logs", str(tmp_path / "logs")], tmp_path)
    else:
        out = torchrun_main([*argv, "--log-root", str(tmp_path / "logs")], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    text = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert text.count("Train Epoch: 0") == N // (2 * LOCAL_B) and "world_size: 2" in text and f"loss: {loss}" in text
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt").exists()


def test_log_root_is_logs_in_a_spelling_torchrun_leaves_alone(capsys):
    import open_clip_train.params as params

    assert params.parse_args(["--log-root", "/runs/a"]).logs == "/runs/a"
    assert params.parse_args(["--logs", "/runs/b"]).logs == "/runs/b"              # upstream's flag unchanged
    with pytest.raises(SystemExit):
        params.parse_args(["--logs", "/runs/b", "--log-root", "/runs/a"])
    assert "--log-root and --logs name the same directory" in capsys.readouterr().err
