"""OpenCLIP's own model contract on the plugin's configs (issue 17).

OpenCLIP 3.3's ``tests/test_inference.py`` runs every name ``open_clip.list_models()`` returns, so with
the plugin installed it collects ours too. For each model it checks that construction and inference are
reproducible (its references come from another process) and that ``forward`` returns a dict unless the
model is exactly ``open_clip.CLIP`` / ``CustomTextCLIP`` (which may return a tuple that agrees with their
``output_dict=True`` dict). Its ``tests/test_training_simple.py`` trains a few steps of synthetic data
through ``open_clip_train.main``, plain, with locked towers plus gradient accumulation, and with
``--torchscript``. This file checks the same contract with its own code.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from _trainer_launch import train
from openclip_align.integration.factory_patch import plugin_model_names

BIG = {name for name in plugin_model_names() if "ViT-B" in name or "ViT-L" in name}   # 86M+ parameters: slow on 2 cores
FAST = sorted(set(plugin_model_names()) - BIG)

# one process computes the reference outputs of a list of models; the test recomputes them in another
REFERENCE_PROCESS = """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import test_upstream_contract as contract
    names, out = sys.argv[3].split(","), sys.argv[2]
    torch.save({name: contract.outputs(name) for name in names}, out)
"""


def seed_everything(seed: int = 0) -> None:
    """As upstream's tests do: fixed seeds and deterministic kernels, so outputs repeat bit for bit."""
    import random

    torch.use_deterministic_algorithms(True, warn_only=False)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _restore_determinism():
    """seed_everything switches deterministic kernels on for the whole process: switch back afterwards."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def random_texts(n: int = 2, words: int = 30):
    """Strings of random BPE words (the text a model sees in upstream's inference test)."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    vocab = [word.replace("</w>", " ") for token_id, word in sorted(tokenizer.decoder.items())
             if token_id not in tokenizer.all_special_ids]
    rng = np.random.default_rng(1)
    return ["".join(rng.choice(vocab, size=words)) for _ in range(n)]


def random_images(size, n: int = 2):
    from PIL import Image

    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 255, size=(size[0], size[1], 3), dtype=np.uint8)) for _ in range(n)]


def build(name):
    seed_everything()
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None, precision="fp32", jit=False, force_quick_gelu=False, pretrained_hf=False)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def inputs(model, preprocess, tokenizer):
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    return torch.stack([preprocess(image) for image in random_images(size)]), tokenizer(random_texts())


def outputs(name):
    model, preprocess, tokenizer = build(name)
    image, text = inputs(model, preprocess, tokenizer)
    with torch.no_grad():
        return {"image": model.encode_image(image), "text": model.encode_text(text)}


_REFERENCES = {}


def reference(name, tmp_path_factory):
    """Outputs of ``name`` computed in a fresh process (all models of its group at once)."""
    if name not in _REFERENCES:
        group = sorted(BIG) if name in BIG else FAST
        out = tmp_path_factory.mktemp("reference") / "outputs.pt"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("OPENCLIP_ALIGN_DISABLE", None)
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(REFERENCE_PROCESS), os.path.dirname(__file__),
                               str(out), ",".join(group)], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        _REFERENCES.update(torch.load(out))
    return _REFERENCES[name]


def test_upstream_lists_every_plugin_config():
    assert set(plugin_model_names()) <= set(open_clip.list_models())
    assert {"AlignCLIP-Tiny", "SharedCLIP-Small", "DualCLIP-Lite0-MiniLM"} <= set(plugin_model_names())


def _models(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in names]


@pytest.mark.parametrize("name", _models(plugin_model_names()))
def test_inference_contract(name, tmp_path_factory):
    expected = reference(name, tmp_path_factory)
    model, preprocess, tokenizer = build(name)
    image, text = inputs(model, preprocess, tokenizer)
    with torch.no_grad():
        # reproducible construction and inference: bit-identical to the other process
        encoded_image, encoded_text = model.encode_image(image), model.encode_text(text)
        assert torch.equal(encoded_text, expected["text"]) and torch.equal(encoded_image, expected["image"])
        out = model(image, text)
        if type(model) in (open_clip.CLIP, open_clip.CustomTextCLIP):
            model.output_dict = True
            as_dict = model(image, text)
            assert torch.equal(as_dict["image_features"], out[0]) and torch.equal(as_dict["text_features"], out[1])
            assert torch.equal(as_dict["logit_scale"], out[2])
            out = as_dict
        else:
            assert type(out) is dict        # upstream: every other class returns a dict
    # the dict holds the normalised encoder outputs and the temperature (independent of forward's code)
    assert torch.allclose(out["image_features"], F.normalize(encoded_image, dim=-1), atol=1e-6)
    assert torch.allclose(out["text_features"], F.normalize(encoded_text, dim=-1), atol=1e-6)
    assert torch.equal(out["logit_scale"], model.logit_scale.exp())


def test_torchscript_wrapper_reads_the_dict():
    """Upstream's jit check: a scripted wrapper that reads ``model(image, text)["image_features"]``."""

    class Head(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.head = torch.nn.Linear(open_clip.get_model_config("AlignCLIP-Tiny")["embed_dim"], 2)

        def forward(self, image, text):
            features = self.model(image, text)["image_features"]
            assert features is not None
            return self.head(features)

    model, preprocess, tokenizer = build("AlignCLIP-Tiny")
    image, text = inputs(model, preprocess, tokenizer)
    wrapper = Head(model).eval()
    scripted = torch.jit.script(wrapper)
    with torch.no_grad():
        assert torch.allclose(scripted(image, text), wrapper(image, text), atol=1e-6)
    # a scripted model's state holds its -inf causal mask: the trainer's checkpoint check must accept it
    from openclip_align.integration.checkpoints import non_finite_tensors

    assert "model.attn_mask" in scripted.state_dict() and non_finite_tensors(scripted.state_dict()) == []


TRAIN = ["--save-frequency", "1", "--zeroshot-frequency", "1", "--dataset-type", "synthetic",
         "--train-num-samples", "16", "--warmup", "1", "--batch-size", "4", "--lr", "1e-3", "--wd", "0.1",
         "--epochs", "1", "--precision", "fp32", "--device", "cpu"]


@pytest.mark.parametrize("name, extra", [
    ("AlignCLIP-Tiny", ["--workers", "1"]),
    ("AlignCLIP-Tiny", ["--workers", "0", "--lock-image", "--lock-image-unlocked-groups", "2", "--accum-freq", "2"]),
    pytest.param("AlignCLIP-Tiny", ["--workers", "0", "--lock-text", "--lock-text-unlocked-layers", "1"],
                 marks=pytest.mark.slow),
    pytest.param("AlignCLIP-Tiny", ["--workers", "0", "--torchscript"], marks=pytest.mark.slow),
    pytest.param("DualCLIP-Tiny", ["--workers", "0", "--lock-image", "--lock-image-unlocked-groups", "1",
                                   "--accum-freq", "2"], marks=pytest.mark.slow),
    pytest.param("DualCLIP-Lite0-MiniLM", ["--workers", "0", "--lock-text", "--lock-text-unlocked-layers", "2"],
                 marks=pytest.mark.slow),
])
def test_training_contract(name, extra, tmp_path):
    # timeout: a busy 2-core machine
    done = train([*TRAIN, "--model", name, *extra], tmp_path, "run", check=False, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point() and "attn_mask" not in k)
    if "--torchscript" not in extra:        # a scripted model's state also holds its buffers
        open_clip.create_model(name, pretrained=str(checkpoint))   # loads back strictly
