"""No host-device synchronisation per training step from the plugin's loss path (issue 19).

Trains imsep, refine and sogclr for one short epoch through ``open_clip_train.main`` in this process, with
the synchronising Tensor methods (``bool``, ``item``, ``float``, ``int``, ``tolist``, ``numpy``, ``cpu``)
wrapped by counters. A call counts when it happens inside the plugin's loss adapter (whoever makes it:
the loss, the teacher, the adapter), or when plugin code makes it anywhere else. Expected: nothing in a
step that upstream does not log, one read of the non-finite record at each log step, a few calls at the
end of the epoch (the last read, the checkpoint record). Where CUDA exists the same runs also go on the GPU
with ``torch.cuda.set_sync_debug_mode("error")`` around the loss's forward and backward at the steps that
are not logged, which catches the synchronisations that are not Tensor methods (blocking copies, ...).
"""
import collections
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import openclip_align
from _trainer_launch import train_here

PLUGIN_DIR = str(Path(openclip_align.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
SYNC_METHODS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")

BATCH, ROWS, LOG_EVERY = 8, 48, 4
STEPS = ROWS // BATCH                                         # 6 steps, one epoch
LOGGED = {s for s in range(STEPS) if s % LOG_EVERY == 0 or s == STEPS - 1}     # upstream's rule: 0, 4, 5

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


class SyncRecorder:
    """Which synchronising calls happen where: inside loss call k (any origin), or from plugin code."""

    def __init__(self):
        self.call = None                  # index of the loss call running now, None outside
        self.calls_done = 0
        self.phase = "setup"              # setup -> steps -> epoch-end
        self.inside = collections.defaultdict(list)     # loss call -> [(method, origin)]
        self.outside = collections.defaultdict(list)    # phase -> [(method, origin)] from plugin code

    def note(self, method: str, tensor) -> None:
        frame = sys._getframe(2)         # whoever called the method
        filename = frame.f_code.co_filename
        entry = (method, f"{_short(filename)}:{frame.f_lineno}", str(tensor.device))
        if self.call is not None:
            self.inside[self.call].append(entry)
        elif filename.startswith(PLUGIN_DIR):
            self.outside[self.phase].append(entry)

    def report(self) -> str:
        def summary(calls):
            counts = collections.Counter(calls)
            return f"{len(calls)}" + "".join(f"\n    {n} x {m} at {o} on {d}" for (m, o, d), n in counts.items())

        lines = [f"  loss call of step {k}{' (logged)' if k in LOGGED else ''}: {summary(self.inside[k])}"
                 for k in range(self.calls_done)]
        lines += [f"  plugin code, {phase}: {summary(calls)}" for phase, calls in self.outside.items()]
        return "\n".join(lines)


def _short(filename: str) -> str:
    for root in (PLUGIN_DIR, TORCH_DIR):
        if filename.startswith(root):
            return os.path.relpath(filename, os.path.dirname(root))
    return os.path.basename(filename)


@pytest.fixture
def recorder(monkeypatch):
    from openclip_align.integration import loss_adapter

    rec = SyncRecorder()
    for method in SYNC_METHODS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _method=method, _original=original, **kwargs):
            rec.note(_method, self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)

    adapter = loss_adapter.TrainerLossAdapter
    forward, start_epoch = adapter.forward, adapter.start_epoch

    def counted_forward(self, image_features, *args, **kwargs):
        rec.call = rec.calls_done
        debug = image_features.is_cuda and rec.call not in LOGGED
        try:
            with sync_debug(debug):
                return forward(self, image_features, *args, **kwargs)
        finally:
            rec.call = None
            rec.calls_done += 1
            if rec.calls_done == STEPS:
                rec.phase = "epoch-end"

    def counted_start_epoch(self, *args, **kwargs):
        rec.phase = "steps"
        return start_epoch(self, *args, **kwargs)

    monkeypatch.setattr(adapter, "forward", counted_forward)
    monkeypatch.setattr(adapter, "start_epoch", counted_start_epoch)

    import open_clip_train.train as upstream_train

    backward = upstream_train.backward

    def checked_backward(total_loss, scaler):          # the loss's backward pass, CUDA only
        with sync_debug(total_loss.is_cuda):
            return backward(total_loss, scaler)

    monkeypatch.setattr(upstream_train, "backward", checked_backward)
    return rec


class sync_debug:
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block when ``on``."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        if self.on:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def data(digits_csv, tmp_path_factory):
    """The 48 digit scans with row-aligned caption embeddings, and a starting checkpoint for refine."""
    import open_clip

    directory = tmp_path_factory.mktemp("sync")
    csv = directory / "train.csv"
    csv.write_text(digits_csv.read_text())
    vectors = np.random.default_rng(0).standard_normal((ROWS, 16)).astype(np.float32)
    np.save(directory / "train.emb.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    torch.manual_seed(0)
    start = directory / "start.pt"
    torch.save({"state_dict": open_clip.create_model("DualCLIP-Tiny").state_dict()}, start)
    return csv, start


def run_trainer(argv, logs: Path, name: str):
    assert train_here(argv, logs, name) is None
    return logs / name


RUNS = {
    "imsep": ["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--semantic-source", "precomputed"],
    "refine": ["--model", "DualCLIP-Tiny", "--loss", "refine", "--pretrained", "{start}"],
    "sogclr": ["--model", "DualCLIP-Tiny", "--loss", "sogclr"],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", sorted(RUNS))
def test_no_synchronisation_per_step(loss, device, data, recorder, tmp_path):
    csv, start = data
    argv = [a.replace("{start}", str(start)) for a in RUNS[loss]]
    argv += ["--train-data", str(csv), "--dataset-type", "csv", "--batch-size", str(BATCH), "--workers", "0",
             "--epochs", "1", "--lr", "1e-4", "--warmup", "1", "--precision", "fp32", "--device", device,
             "--seed", "0", "--log-every-n-steps", str(LOG_EVERY)]
    run = run_trainer(argv, tmp_path, f"{loss}-{device}")
    report = recorder.report()
    print(f"--loss {loss} on {device}, synchronising calls:\n{report}")

    assert recorder.calls_done == STEPS, report
    assert (run / "checkpoints" / "epoch_1.pt").exists()
    for step in range(STEPS):
        calls = recorder.inside[step]
        if step in LOGGED:       # the non-finite record is read once, where upstream reads the loss anyway
            assert len(calls) == 1 and "loss_adapter.py" in calls[0][1], report
        else:
            assert calls == [], report
    assert recorder.outside["steps"] == [], report            # plugin code between the loss calls
    at_end = recorder.outside["epoch-end"]                     # the last read, the checkpoint's record
    assert 1 <= len(at_end) <= 8, report
    if loss == "refine":     # the teacher ran on the model's own inputs, not on a second copy of the batch
        from openclip_align.integration import run_state

        assert all("model_images" in item for item in run_state.RUN.stash._items)


def test_refine_teacher_is_compiled_with_the_student(data, tmp_path, monkeypatch):
    """--torchcompile: the teacher runs under torch.compile too (dynamo's eager backend keeps this quick)."""
    from openclip_align.integration import run_state

    compile_ = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module).__name__)
                        or compile_(module, backend="eager"))
    csv, start = data
    run = run_trainer(["--model", "DualCLIP-Tiny", "--loss", "refine", "--pretrained", str(start), "--torchcompile",
                       "--train-data", str(csv), "--dataset-type", "csv", "--batch-size", "16", "--workers", "0",
                       "--epochs", "1", "--lr", "1e-5", "--precision", "fp32", "--device", "cpu"], tmp_path, "compiled")
    assert compiled == ["CLIP", "TeacherEncoder"]
    assert isinstance(run_state.RUN.teacher_encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert (run / "checkpoints" / "epoch_1.pt").exists()


# --- what replaced the per-step checks ---------------------------------------------------------------
class _TermsLoss(torch.nn.Module):
    """Two terms; the second one NaN from call ``bad_from`` on."""

    def __init__(self, bad_from: int):
        super().__init__()
        self.bad_from, self.calls = bad_from, 0

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        self.calls += 1
        second = torch.tensor(float("nan") if self.calls > self.bad_from else 1.0)
        return {"first_loss": image_features.sum() * 0 + 2.0, "second_loss": second}


def _adapter(loss, **args):
    import argparse
    from types import SimpleNamespace

    from openclip_align.integration.loss_adapter import TrainerLossAdapter

    options = {"loss": "fake", "accum_freq": 1, "log_every_n_steps": 3, **args}
    run = SimpleNamespace(args=argparse.Namespace(**options), needs=set(), needs_teacher=False)
    return TrainerLossAdapter(run, loss)


def test_a_non_finite_loss_stops_the_run_at_the_next_log_step_naming_its_terms():
    adapter = _adapter(_TermsLoss(bad_from=1))
    adapter.start_epoch(0, 6)                        # logged steps: 0, 3, 5
    x = torch.ones(2, 3)
    adapter(x, x, torch.tensor(1.0))                 # step 0 (logged): finite
    adapter(x, x, torch.tensor(1.0))                 # step 1: NaN, recorded on the device, not read
    adapter(x, x, torch.tensor(1.0))                 # step 2
    with pytest.raises(FloatingPointError) as error:
        adapter(x, x, torch.tensor(1.0))             # step 3 (logged): read
    message = str(error.value)
    assert message.startswith("--loss fake became non-finite (second_loss, sum of the terms)")
    assert "first at step 1 of epoch 0" in message and "'first_loss': 2.0" in message
    with pytest.raises(FloatingPointError):          # the epoch end and the checkpoint hook read it too
        adapter.check_finite()


def test_the_non_finite_record_is_read_at_the_epoch_end_and_counts_steps_with_accumulation():
    adapter = _adapter(_TermsLoss(bad_from=4), accum_freq=2, log_every_n_steps=100)
    x = torch.ones(2, 3)
    adapter.start_epoch(0, 2)
    for _ in range(4):                               # 2 steps of 2 calls; the last is a logged step
        adapter(x, x, torch.tensor(1.0))
    adapter.check_finite()
    adapter.start_epoch(1, 3)
    for _ in range(4):                               # calls 5-6 (step 0, logged), 7-8 (step 1): NaN from call 5
        try:
            adapter(x, x, torch.tensor(1.0))
        except FloatingPointError as error:
            assert "first at step 0 of epoch 1" in str(error)
            break
    else:
        pytest.fail("step 0 of epoch 1 is logged: the NaN must be reported there")


def test_values_are_checked_on_the_cpu_and_not_on_an_accelerator_or_inside_the_trainer():
    from openclip_align.losses._common import check_rows, inputs_validated

    bad = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        check_rows("imsep", "semantic_features", bad, 2, "hint")
    with inputs_validated():                         # the trainer validated its extras on the host
        check_rows("imsep", "semantic_features", bad, 2, "hint")
    check_rows("imsep", "semantic_features", torch.empty(2, 2, device="meta"), 2, "hint")   # no read-back
    with pytest.raises(ValueError, match="batch has 3 pairs"):                                # shapes: always
        check_rows("imsep", "semantic_features", torch.empty(2, 2, device="meta"), 3, "hint")


def test_stash_hands_the_teacher_the_models_own_inputs():
    from openclip_align.integration.batch_extras import BatchStash

    stash = BatchStash(depth=2)
    cpu = [(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.long)) for _ in range(2)]
    model = [(torch.full((2, 3), 5.0, dtype=torch.float64), torch.full((2, 4), 7)) for _ in range(2)]
    stash.push(*cpu[0], {})
    stash.record_model_inputs(*model[0])
    stash.record_model_inputs(torch.zeros(2, 3), torch.zeros(2, 4))        # a second forward: ignored
    assert stash.take(2)["images"] is model[0][0] and stash.take(2)["texts"] is model[0][1]
    stash.push(*cpu[1], {})
    assert stash.take(4)["images"].dtype == torch.float32                 # one batch lacks them: the loader's
    stash.record_model_inputs(*model[1])
    both = stash.take(4)
    assert both["images"].dtype == torch.float64 and both["texts"].tolist() == [[7] * 4] * 4


def test_teacher_takes_the_students_dtype_memory_format_and_compilation(monkeypatch):
    import argparse
    import copy
    from types import SimpleNamespace

    import open_clip

    from openclip_align.integration.teacher import TeacherEncoder, prepare_teacher

    student = open_clip.create_model("DualCLIP-Tiny")
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.to(torch.bfloat16).to(memory_format=torch.channels_last)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    run = SimpleNamespace(teacher=teacher, spec=SimpleNamespace(raw_features=True), teacher_encoder=None,
                          args=argparse.Namespace(torchcompile=True))
    encoder = prepare_teacher(run, student, None)
    assert isinstance(encoder, TeacherEncoder) and compiled == [encoder] and run.teacher_encoder is encoder
    for name, tensor in teacher.state_dict().items():
        assert tensor.dtype == student.state_dict()[name].dtype, name
    assert teacher.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 32, 32, dtype=torch.bfloat16)
    texts = open_clip.get_tokenizer("DualCLIP-Tiny")(["a", "b"])
    image_features, text_features = encoder(images, texts)
    assert image_features.dtype == torch.bfloat16 and image_features.norm(dim=-1).min() > 1.01   # raw

    run.args.torchcompile = False
    compiled.clear()
    prepare_teacher(run, student, None)
    assert compiled == []


def _refused_before_step_1(argv, tmp_path, name, match):
    from openclip_align.data.errors import MissingExtrasError

    with pytest.raises(MissingExtrasError, match=match):
        run_trainer([*argv, "--dataset-type", "csv", "--batch-size", str(BATCH), "--workers", "0", "--epochs", "1",
                     "--precision", "fp32", "--device", "cpu"], tmp_path, name)
    assert "Train Epoch" not in (tmp_path / name / "out.log").read_text()


def test_non_finite_embeddings_are_refused_before_the_first_step(data, tmp_path):
    csv, _ = data
    bad = tmp_path / "train.csv"
    bad.write_text(csv.read_text())
    vectors = np.load(csv.with_suffix(".emb.npy"))
    vectors[7, 3] = np.inf
    np.save(tmp_path / "train.emb.npy", vectors)
    _refused_before_step_1(["--model", "AlignCLIP-Tiny", "--loss", "imsep", "--train-data", str(bad)],
                           tmp_path, "run", r"train\.emb\.npy: row 7 holds non-finite values")


def test_indices_outside_the_dataset_are_refused_before_the_first_step(data, tmp_path):
    csv, _ = data
    lines = csv.read_text().splitlines()
    rows = [lines[0] + "\tindex"] + [f"{line}\t{i if i != 30 else 48}" for i, line in enumerate(lines[1:])]
    bad = tmp_path / "train.csv"
    bad.write_text("\n".join(rows) + "\n")
    _refused_before_step_1(["--model", "DualCLIP-Tiny", "--loss", "sogclr", "--train-data", str(bad)],
                           tmp_path, "run", r"dataset index 48 is outside \[0, 48\)")


def test_shard_samples_are_checked_as_they_are_decoded():
    from openclip_align.data.errors import CorpusError
    from openclip_align.integration.batch_extras import _SampleToTupleWithExtras
    from openclip_align.integration.training_shards import ShardPlan, ShardSampleExtras

    plan = ShardPlan(urls=[], total=10)
    to_tuple = _SampleToTupleWithExtras({"index", "semantic"},
                                        ShardSampleExtras(plan, {"index", "semantic"}, "precomputed"))
    sample = {"__key__": "k", "image": 0, "text": 1, "json": {"index": 9}, "emb.npy": np.ones(4, np.float32)}
    assert to_tuple(sample)[2]["index"] == 9
    with pytest.raises(CorpusError, match="sample k: dataset index 10 is outside"):
        to_tuple({**sample, "json": {"index": 10}})
    with pytest.raises(CorpusError, match="sample k: the caption embedding holds non-finite"):
        to_tuple({**sample, "emb.npy": np.array([1.0, np.nan, 0.0, 0.0], np.float32)})
