"""The state-dict layout of the AlignCLIP authors' own code, and its mapping onto SharedCLIP's names.

The authors trained SharedCLIP / AlignCLIP with their fork of OpenCLIP (``align_clip``), whose checkpoints
(``{"epoch", "name", "state_dict", "optimizer", ...}``) hold the same architecture under other names:

=================================  ================================  =================================
theirs                             ours (:class:`SharedCLIP`)         note
=================================  ================================  =================================
``transformer.resblocks.N.*``      ``transformer.resblocks.N.*``      same blocks, same names
``visual.conv1.weight``,           same                               the image stem
``visual.class_embedding``,
``visual.positional_embedding``,
``visual.ln_pre.*``
``text.token_embedding.weight``    ``token_embedding.weight``
``text.positional_embedding``      ``positional_embedding``
``text.text_projection``           (dropped)                          created uninitialised, never used
``ln_post.*``                      ``ln_final.*``                     the shared final LayerNorm
``projection`` (width x embed)     ``proj.weight`` (embed x width)    they compute ``x @ projection``
``logit_scale``                    ``logit_scale``
=================================  ================================  =================================

A checkpoint carries no head count (the attention weights are width x 3 width whatever it is); their
code uses heads = width / 64, as every plugin config of their shapes does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

# top-level names only their layout has (OpenCLIP's have visual.ln_post, text_projection, ln_final)
AUTHORS_MARKERS = ("projection", "ln_post.weight", "ln_post.bias")
AUTHORS_REQUIRED = ("projection", "ln_post.weight", "ln_post.bias", "logit_scale", "text.token_embedding.weight",
                    "text.positional_embedding", "visual.conv1.weight", "visual.class_embedding",
                    "visual.positional_embedding", "visual.ln_pre.weight", "visual.ln_pre.bias",
                    "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.weight")
AUTHORS_UNUSED = ("text.text_projection",)
# the names that make a file SharedCLIP's own OpenCLIP layout (a strict load then reports any other difference)
PLUGIN_MARKERS = ("proj.weight", "ln_final.weight", "token_embedding.weight", "visual.conv1.weight")
_RENAMED = {"text.token_embedding.weight": "token_embedding.weight",
            "text.positional_embedding": "positional_embedding",
            "ln_post.weight": "ln_final.weight", "ln_post.bias": "ln_final.bias"}
_THEIR_NAME = {**{ours: theirs for theirs, ours in _RENAMED.items()}, "proj.weight": "projection"}


class CheckpointLayoutError(ValueError):
    """A checkpoint the requested model cannot load: wrong layout or wrong shapes (shown as one line)."""

    user_facing = True          # the trainer's exception hook prints it without a traceback


def is_authors_layout(state_dict: Dict) -> bool:
    return any(key in state_dict for key in AUTHORS_MARKERS)


def is_plugin_layout(state_dict: Dict) -> bool:
    return all(key in state_dict for key in PLUGIN_MARKERS)


def their_name(ours: str) -> str:
    """The authors' name of one of our parameters (for messages about their files)."""
    return _THEIR_NAME.get(ours, ours)


@dataclass(frozen=True)
class Shapes:
    """What a shared-transformer CLIP's tensors fix: everything a config states except the head count."""

    width: int
    embed_dim: int
    layers: int
    mlp_width: int
    patch_size: int
    image_size: int
    context_length: int
    vocab_size: int


def shapes_of_config(embed_dim: int, spec) -> Shapes:
    """The tensor shapes a SharedCLIP config (its :class:`SharedTowerSpec`) builds."""
    return Shapes(width=spec.width, embed_dim=int(embed_dim), layers=spec.layers,
                  mlp_width=int(spec.width * spec.mlp_ratio), patch_size=spec.patch_size,
                  image_size=spec.image_size, context_length=spec.context_length, vocab_size=spec.vocab_size)


def shapes_of_authors_file(state_dict: Dict) -> Shapes:
    missing = [key for key in AUTHORS_REQUIRED if key not in state_dict]
    if missing:
        raise CheckpointLayoutError(
            f"has the AlignCLIP authors' top-level names but lacks {', '.join(missing)}: not a complete "
            "checkpoint of their code")
    width, embed_dim = state_dict["projection"].shape
    patch_size = int(state_dict["visual.conv1.weight"].shape[-1])
    patches = int(state_dict["visual.positional_embedding"].shape[0]) - 1
    grid = round(patches ** 0.5)
    blocks = {key.split(".")[2] for key in state_dict if key.startswith("transformer.resblocks.")}
    return Shapes(width=int(width), embed_dim=int(embed_dim), layers=len(blocks),
                  mlp_width=int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                  patch_size=patch_size, image_size=grid * patch_size if grid * grid == patches else -1,
                  context_length=int(state_dict["text.positional_embedding"].shape[0]),
                  vocab_size=int(state_dict["text.token_embedding.weight"].shape[0]))


def shape_differences(found: Shapes, wanted: Shapes) -> List[str]:
    """Each difference as 'TENSOR is X in the file, {config} wants Y' (the caller fills in the config)."""
    rows = [
        ("projection", f"is {found.width}x{found.embed_dim}", f"{wanted.width}x{wanted.embed_dim}",
         found.width != wanted.width or found.embed_dim != wanted.embed_dim),
        ("transformer.resblocks", f"has {found.layers} blocks", f"{wanted.layers}", found.layers != wanted.layers),
        ("mlp.c_fc", f"is {found.mlp_width} wide", f"{wanted.mlp_width}", found.mlp_width != wanted.mlp_width),
        ("visual.conv1.weight", f"has patch {found.patch_size}", f"{wanted.patch_size}",
         found.patch_size != wanted.patch_size),
        ("visual.positional_embedding",
         f"is for {found.image_size} px" if found.image_size > 0 else "is not a square grid of patches",
         f"{wanted.image_size} px", found.image_size != wanted.image_size),
        ("text.positional_embedding", f"has {found.context_length} tokens", f"{wanted.context_length}",
         found.context_length != wanted.context_length),
        ("text.token_embedding.weight", f"has {found.vocab_size} tokens", f"{wanted.vocab_size}",
         found.vocab_size != wanted.vocab_size),
    ]
    return [f"{name} {have} in the file, {{config}} wants {want}" for name, have, want, differs in rows if differs]


def to_plugin_state_dict(state_dict: Dict) -> Dict:
    """Their tensors under SharedCLIP's names (values shared, ``projection`` transposed)."""
    out = {}
    for key, value in state_dict.items():
        if key in AUTHORS_UNUSED:
            continue
        if key == "projection":
            out["proj.weight"] = value.t().contiguous()
        else:
            out[_RENAMED.get(key, key)] = value
    return out


def key_differences(converted: Iterable[str], model_keys: Iterable[str], optional=("logit_bias",)) -> Optional[str]:
    """Missing / unexpected tensors after conversion, in the authors' names; None when the names fit."""
    converted, model_keys = set(converted), set(model_keys)
    missing = sorted(their_name(k) for k in model_keys - converted if k not in optional)
    unexpected = sorted(converted - model_keys)
    if not missing and not unexpected:
        return None
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    return "; ".join(parts)
