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

    from openclip_align.integration.trainer_args import parse_args_with_plugin

    upstream = getattr(params.parse_args, "__wrapped__", params.parse_args)
    return parse_args_with_plugin(upstream)(argv)


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
