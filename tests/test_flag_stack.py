"""The flag stack users train with, per plugin loss (issue 29 item 7).

Fast checks at the loss / model level, in process: ``--precision amp_bf16`` against fp32 on the same
inputs, ``--grad-checkpointing`` against plain backward, ``--torchcompile`` (dynamo) against eager, and the
refusals a plugin loss makes before step 1. Slow checks run the real trainer (tests/_trainer_harness.py via
tests/test_trainer_distributed.py's launcher): inductor compile, ``::`` mixtures with upsampling factors
under ``--dataset-resampled``, and everything together on two CPU ranks.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from openclip_align.losses.registry import get_loss_spec

PLUGIN_LOSSES = ("imsep", "refine", "sogclr", "cyclip", "vicreg", "onlineclr")
B, D, SEMANTIC_D = 32, 64, 16

# bf16 keeps 8 significant bits: round-to-nearest changes a value by at most u = 2**-9 of itself. Under
# amp_bf16 a loss sees features rounded once to bf16 and (outside the plugin's own fp32 regions) one bf16
# matmul whose result is rounded once more; a smooth loss of unit-scale features then moves by a few u
# relative. 4u = 2**-7 (0.78%) lets four such roundings add up in the worst case. It is far below what a
# loss computed wholly in bf16 would show at a small temperature: a logit d / 0.01 of about 100 rounds to
# +-0.4, which moves SogCLR's loss by several percent (the control below shows the tolerance catches it).
BF16_U = 2.0 ** -9
AMP_REL_TOL = 4 * BF16_U


def _inputs():
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(B, D, generator=gen), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(B, D, generator=gen), dim=-1)
    return {
        "image_features": image, "text_features": text,
        "teacher_image_features": F.normalize(image + 0.3 * torch.randn(B, D, generator=gen), dim=-1),
        "teacher_text_features": F.normalize(text + 0.3 * torch.randn(B, D, generator=gen), dim=-1),
        "semantic_features": F.normalize(torch.randn(B, SEMANTIC_D, generator=gen), dim=-1),
        "index": torch.arange(B),
        "logit_scale": torch.tensor(1 / 0.07),
    }


def _make(name):
    cls = get_loss_spec(name).cls
    return cls(num_samples=B) if name == "sogclr" else cls()


def _total(loss, inputs):
    out = loss(**inputs, output_dict=True)
    return sum(out.values()) if isinstance(out, dict) else out


FEATURES = ("image_features", "text_features", "teacher_image_features", "teacher_text_features")


def _amp_loss(name, inputs):
    """The loss as the trainer runs it under amp_bf16: inside bf16 autocast, on features the autocast
    model produced (bf16)."""
    bf16 = {k: (v.bfloat16() if k in FEATURES else v) for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _total(_make(name), bf16)


@pytest.mark.parametrize("name", PLUGIN_LOSSES)
def test_amp_bf16_loss_is_within_bf16_rounding_of_fp32(name):
    inputs = _inputs()
    fp32 = _total(_make(name), inputs)
    amp = _amp_loss(name, inputs)
    assert torch.isfinite(amp) and amp.dtype == torch.float32, amp   # the loss is reported at full precision
    assert float(amp) == pytest.approx(float(fp32), rel=AMP_REL_TOL), (name, float(amp), float(fp32))


def test_the_amp_tolerance_catches_a_loss_computed_in_bf16(monkeypatch):
    """Control: SogCLR at tau 0.01 with its full-precision region switched off differs by more than the tolerance."""
    import openclip_align.losses.sogclr as sogclr

    inputs = _inputs()
    fp32 = float(_total(_make("sogclr"), inputs))
    monkeypatch.setattr(sogclr, "no_autocast", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(sogclr, "compute_dtype", lambda *tensors: torch.bfloat16)
    careless = float(_amp_loss("sogclr", inputs))
    assert abs(careless - fp32) > AMP_REL_TOL * abs(fp32), (careless, fp32)


# --- grad checkpointing and compile: the model's part, with each plugin loss on its outputs ---------------
MODEL_FOR = {"imsep": "AlignCLIP-Tiny", "refine": "DualCLIP-Tiny", "sogclr": "DualCLIP-Tiny",
             "cyclip": "SharedCLIP-Tiny", "vicreg": "SharedCLIP-Tiny", "onlineclr": "AlignCLIP-Tiny"}
_MODELS = {}


def _tiny(name):
    import open_clip

    if name not in _MODELS:
        torch.manual_seed(0)
        model = open_clip.create_model(name, output_dict=True)          # as the trainer builds it
        tokens = open_clip.get_tokenizer(name)([f"caption number {i}" for i in range(8)])
        images = torch.randn(8, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(1))
        _MODELS[name] = (model.train(), images, tokens)
    return _MODELS[name]


def _loss_gradients(model, forward, images, tokens, loss_name):
    """Gradients of every parameter of ``model`` for the plugin loss on ``forward``'s features."""
    model.zero_grad(set_to_none=True)
    out = forward(images, tokens)
    inputs = _inputs()
    rows = images.shape[0]
    inputs.update(image_features=out["image_features"], text_features=out["text_features"],
                  logit_scale=out["logit_scale"], index=torch.arange(rows),
                  semantic_features=inputs["semantic_features"][:rows],
                  teacher_image_features=out["image_features"].detach() + 0.01,
                  teacher_text_features=out["text_features"].detach() + 0.01)
    loss = _total(_make(loss_name), inputs)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", PLUGIN_LOSSES)
def test_grad_checkpointing_gives_the_same_gradients(loss_name):
    """Checkpointing recomputes each block's forward during backward (its start counted: the recompute stops
    once it has what backward needs, so a forward hook would not see it) and changes no gradient."""
    model, images, tokens = _tiny(MODEL_FOR[loss_name])
    blocks = [m for n, m in model.named_modules() if n.endswith("resblocks.0")]
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    try:
        model.set_grad_checkpointing(False)
        plain_loss, plain = _loss_gradients(model, model, images, tokens, loss_name)
        plain_calls, calls[:] = len(calls), []
        model.set_grad_checkpointing(True)
        ckpt_loss, ckpt = _loss_gradients(model, model, images, tokens, loss_name)
    finally:
        model.set_grad_checkpointing(False)
        for hook in hooks:
            hook.remove()
    assert len(calls) == 2 * plain_calls > 0                    # the forward really ran again in backward
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for key, grad in plain.items():
        torch.testing.assert_close(ckpt[key], grad, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("model_name", ["AlignCLIP-Tiny"])          # the plugin's own model class
def test_compiled_model_gives_the_same_loss_and_gradients(model_name):
    """``--torchcompile`` compiles the model (the loss stays eager): dynamo + AOT autograd (the part of
    inductor that traces; inductor's C++ codegen runs in the slow trainer test) change no value."""
    import torch._dynamo

    model, images, tokens = _tiny(model_name)
    loss_name = "imsep" if model_name.startswith("AlignCLIP") else "sogclr"
    eager_loss, eager = _loss_gradients(model, model, images, tokens, loss_name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss, grads = _loss_gradients(model, compiled, images, tokens, loss_name)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for key, grad in eager.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


# --- what a flag cannot do with a plugin loss: refused while the arguments are parsed -------------------
def _parse(argv):
    import open_clip_train.params as params

    from openclip_align.integration.trainer_args import parse_with_plugin

    upstream = getattr(params.parse_args, "__wrapped__", params.parse_args)
    return parse_with_plugin(argv, upstream)


BASE = ["--train-data", "x.csv", "--model", "AlignCLIP-Tiny", "--device", "cpu"]


@pytest.mark.parametrize("loss", PLUGIN_LOSSES)
@pytest.mark.parametrize("flags,why,use", [
    (["--siglip"], "sigmoid", "--loss clip --siglip"),
    (["--distill-model", "ViT-S-32", "--distill-pretrained", "x.pt"], "DistillClipLoss", "--loss refine"),
    (["--horovod"], "horovod", "torchrun"),
])
def test_a_flag_a_plugin_loss_cannot_follow_is_refused_saying_why_and_what_to_use(capsys, loss, flags, why, use):
    extra = ["--pretrained", "x.pt"] if loss == "refine" else []
    with pytest.raises(SystemExit) as info:
        _parse([*BASE, "--loss", loss, *extra, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--loss {loss}" in err and why in err and use in err, err


def test_a_coca_model_with_a_plugin_loss_is_refused(capsys):
    with pytest.raises(SystemExit):
        _parse(["--train-data", "x.csv", "--model", "coca_ViT-B-32", "--loss", "imsep"])
    err = capsys.readouterr().err
    assert "CoCa" in err and "--loss clip" in err


@pytest.mark.parametrize("loss", PLUGIN_LOSSES)
def test_the_full_stack_parses_for_every_plugin_loss(loss):
    """The command of docs/training.md's "Your command at scale" is accepted as it is."""
    extra = ["--pretrained", "x.pt"] if loss == "refine" else []
    args = _parse([*BASE, "--loss", loss, *extra, "--precision", "amp_bf16", "--torchcompile",
                   "--grad-checkpointing", "--local-loss", "--gather-with-grad", "--accum-freq", "2",
                   "--dataset-resampled", "--train-data-upsampling-factors", "1::2"])
    assert (args.loss, args.precision, args.torchcompile, args.grad_checkpointing, args.local_loss,
            args.gather_with_grad, args.accum_freq, args.dataset_resampled) == \
        (loss, "amp_bf16", True, True, True, True, 2, True)


# --- the trainer: everything together on two CPU ranks (slow) ------------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trainer_launch import calls, run_ranks  # noqa: E402
from conftest import write_digits_csv  # noqa: E402

SOURCE_ROWS = 24                # per source; indices 0..23 (A) and 24..47 (B): one index space for SogCLR


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Two webdataset sources (different folders, one shard each, sizes.json beside), every sample with its
    caption embedding and dataset index; and a DualCLIP-Tiny start for --loss refine."""
    import json

    import numpy as np
    import open_clip
    import pandas as pd
    import webdataset as wds

    root = tmp_path_factory.mktemp("flag_stack")
    rows = pd.read_csv(write_digits_csv(root / "images", n=2 * SOURCE_ROWS), sep="\t")
    vectors = np.random.default_rng(0).standard_normal((2 * SOURCE_ROWS, SEMANTIC_D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    urls = []
    for part, folder in enumerate(("A", "B")):
        (root / folder).mkdir()
        name = f"{folder.lower()}-000000.tar"
        with wds.TarWriter(str(root / folder / name)) as sink:
            for i in range(part * SOURCE_ROWS, (part + 1) * SOURCE_ROWS):
                sink.write({"__key__": f"{i:09d}", "png": Path(rows.filepath[i]).read_bytes(), "txt": rows.title[i],
                            "json": {"index": i}, "emb.npy": vectors[i]})
        (root / folder / "sizes.json").write_text(json.dumps({name: SOURCE_ROWS}))
        urls.append(str(root / folder / name))
    starts = {}
    for model_name in set(MODEL_FOR.values()):
        torch.manual_seed(0)
        starts[model_name] = root / f"{model_name}.pt"
        torch.save({"state_dict": open_clip.create_model(model_name).state_dict()}, starts[model_name])
    return root, "::".join(urls), starts


FULL_STACK = ["--precision", "amp_bf16", "--torchcompile", "--grad-checkpointing", "--local-loss",
              "--gather-with-grad", "--accum-freq", "2", "--dataset-resampled", "--train-data-upsampling-factors",
              "1::2"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", PLUGIN_LOSSES)
def test_full_stack_on_two_ranks(mixture, loss, tmp_path):
    """``torchrun --nproc_per_node 2``: amp_bf16 + inductor + grad checkpointing + --local-loss
    --gather-with-grad --accum-freq 2 on a ``::`` mixture upsampled 1::2 under --dataset-resampled. 64 samples
    an epoch at 8 per rank and step part: 4 batches per rank, 2 optimizer steps, 4 loss calls per rank (the
    loss runs once per accumulated batch); every loss value finite, the weights moved and stayed finite."""
    root, train_data, starts = mixture
    extra = ["--semantic-source", "precomputed"] if get_loss_spec(loss).needs - {"index"} else []
    argv = ["--model", MODEL_FOR[loss], "--pretrained", str(starts[MODEL_FOR[loss]]), "--loss", loss, *extra,
            "--train-data", train_data, "--dataset-type", "webdataset", "--train-num-samples", "64",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1", "--lr", "1e-4",
            "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1", *FULL_STACK]
    run = run_ranks(argv, tmp_path, f"stack-{loss}")
    for rank in (0, 1):
        terms = calls(run, rank)
        assert len(terms) == 4, (rank, terms)
        assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in terms), terms
    state = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    start = torch.load(starts[MODEL_FOR[loss]], map_location="cpu", weights_only=True)["state_dict"]
    assert weights.keys() == start.keys()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert any(not torch.equal(weights[k], start[k]) for k in start)       # two SGD steps moved the weights


def test_a_mixture_is_sized_from_each_sources_own_folder(tmp_path):
    """SogCLR sizes its state from the dataset size: for A::B in two folders, the sum of both sizes.json."""
    import json

    import open_clip_train.data as data_module

    from openclip_align.data.dataset_index import dataset_size

    for folder, sizes in (("A", {"a-000000.tar": 7, "a-000001.tar": 5}), ("B", {"b-000000.tar": 30})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "sizes.json").write_text(json.dumps(sizes))
    mixture = f"{tmp_path}/A/a-{{000000..000001}}.tar::{tmp_path}/B/b-000000.tar"
    assert dataset_size(mixture, data_module.get_dataset_size) == 7 + 5 + 30
    (tmp_path / "B" / "sizes.json").unlink()
    assert dataset_size(mixture, data_module.get_dataset_size) is None            # one source without a size: unknown
