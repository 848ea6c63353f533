"""Reading and validating a SharedCLIP config (the upstream-style ``vision_cfg`` / ``text_cfg`` pair).

Configs keep OpenCLIP's layout so that ``open_clip.get_tokenizer`` and other tools that read
``text_cfg`` work unchanged. Because the transformer is shared, the two halves must agree on
width, depth, heads and MLP ratio; a mismatch is a config error, reported by name.
"""
from __future__ import annotations

from dataclasses import dataclass

_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "heads", "head_width", "mlp_ratio", "patch_dropout"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "layers", "heads", "mlp_ratio"}


class SharedCLIPConfigError(ValueError):
    """A SharedCLIP config that cannot describe one shared transformer."""


@dataclass(frozen=True)
class SharedTowerSpec:
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    image_size: int
    patch_size: int
    patch_dropout: float
    context_length: int
    vocab_size: int


def _square(value, what: str, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise SharedCLIPConfigError(f"{name}: {what} must be square, got {value}")
        value = value[0]
    return int(value)


def parse_shared_config(embed_dim: int, vision_cfg: dict, text_cfg: dict, name: str = "SharedCLIP") -> SharedTowerSpec:
    vision_cfg, text_cfg = dict(vision_cfg), dict(text_cfg)
    for cfg, allowed, side in ((vision_cfg, _VISION_KEYS, "vision_cfg"), (text_cfg, _TEXT_KEYS, "text_cfg")):
        unknown = set(cfg) - allowed
        if unknown:
            raise SharedCLIPConfigError(
                f"{name}: {side} has options SharedCLIP does not support: {sorted(unknown)} "
                f"(supported: {sorted(allowed)})"
            )
    v_width = int(vision_cfg.get("width", 768))
    if "heads" in vision_cfg:
        v_heads = int(vision_cfg["heads"])
    else:
        v_heads = v_width // int(vision_cfg.get("head_width", 64))
    vision = dict(width=v_width, layers=int(vision_cfg.get("layers", 12)), heads=v_heads,
                  mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)))
    text = dict(width=int(text_cfg.get("width", 512)), layers=int(text_cfg.get("layers", 12)),
                heads=int(text_cfg.get("heads", 8)), mlp_ratio=float(text_cfg.get("mlp_ratio", 4.0)))
    for key in vision:
        if vision[key] != text[key]:
            raise SharedCLIPConfigError(
                f"{name}: text {key} ({text[key]}) != vision {key} ({vision[key]}); SharedCLIP runs both "
                f"modalities through ONE transformer, so vision_cfg and text_cfg must agree on {key}"
            )
    if vision["width"] % vision["heads"]:
        raise SharedCLIPConfigError(f"{name}: width {vision['width']} is not divisible by heads {vision['heads']}")
    image_size = _square(vision_cfg.get("image_size", 224), "image_size", name)
    patch_size = _square(vision_cfg.get("patch_size", 16), "patch_size", name)
    if patch_size <= 0 or image_size % patch_size:
        raise SharedCLIPConfigError(
            f"{name}: image size {image_size} is not divisible by the patch size {patch_size}"
        )
    if int(embed_dim) <= 0:
        raise SharedCLIPConfigError(f"{name}: embed_dim must be positive, got {embed_dim}")
    return SharedTowerSpec(
        width=vision["width"], layers=vision["layers"], heads=vision["heads"], mlp_ratio=vision["mlp_ratio"],
        image_size=image_size, patch_size=patch_size, patch_dropout=float(vision_cfg.get("patch_dropout", 0.0)),
        context_length=int(text_cfg.get("context_length", 77)), vocab_size=int(text_cfg.get("vocab_size", 49408)),
    )
