"""``pretrained=PATH`` also loads checkpoints written by the AlignCLIP authors' own code.

OpenCLIP's ``create_model`` loads a checkpoint file with ``factory.load_checkpoint``, which reads it with
``factory.load_state_dict`` and then renames, resizes and loads. The plugin wraps the two: while
``load_checkpoint`` runs, it knows the model being loaded, so right after the file is read (once) the state
dict is checked against that model:

* a file in the authors' layout (:mod:`openclip_align.models.authors_layout`) loading into a SharedCLIP
  model is checked shape by shape against the config and renamed to our names; a mismatch is an error that
  names each differing tensor and the plugin configs that do fit;
* a file in the authors' layout loading into any other model is an error naming the configs that fit;
* a file that is neither layout, loading into a SharedCLIP model, is an error saying so;
* every other file and model goes on exactly as upstream (the state dict is returned untouched).
"""
from __future__ import annotations

import contextvars
import functools
import json

from openclip_align.models.authors_layout import (
    CheckpointLayoutError, PLUGIN_MARKERS, AUTHORS_MARKERS, is_authors_layout, is_plugin_layout, key_differences,
    shape_differences, shapes_of_authors_file, shapes_of_config, to_plugin_state_dict,
)

from .wrapping import CONFIG_DIR, with_context

_PATCHED = "__openclip_align_authors_loading__"
_TARGET = contextvars.ContextVar("openclip_align_checkpoint_target", default=None)   # (model, path)
_MODEL_NAME = contextvars.ContextVar("openclip_align_model_name", default=None)
AUTHORS_PREFIX = "AlignCLIP-Authors-"


def configs_with_shapes(shapes):
    """Plugin config names whose SharedCLIP builds exactly these tensor shapes, AlignCLIP-Authors-* first."""
    from openclip_align.models.shared_config import parse_shared_config

    names = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("model_class") != "SharedCLIP":
            continue
        spec = parse_shared_config(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], name=path.stem)
        if shapes_of_config(cfg["embed_dim"], spec) == shapes:
            names.append(path.stem)
    return sorted(names, key=lambda n: (not n.startswith(AUTHORS_PREFIX), n))


def _use_hint(shapes) -> str:
    fitting = configs_with_shapes(shapes)
    if fitting:
        return f"use {fitting[0]}" + (f" (or {', '.join(fitting[1:3])})" if len(fitting) > 1 else "")
    return (f"no plugin config has its shapes (width {shapes.width}, {shapes.layers} layers, embed "
            f"{shapes.embed_dim}, {shapes.image_size} px, {shapes.context_length} tokens): add one as in docs/models.md")


def adapt_state_dict(state_dict, model, path, model_name=None):
    """The state dict ``model`` should load from ``path``: converted, checked, or refused (see module doc)."""
    from openclip_align.models.shared_clip import SharedCLIP

    config = f"the config {model_name}" if model_name else "this model's config"
    if is_authors_layout(state_dict):
        try:
            found = shapes_of_authors_file(state_dict)
        except CheckpointLayoutError as err:
            raise CheckpointLayoutError(f"{path} {err}") from None
        if not isinstance(model, SharedCLIP):
            raise CheckpointLayoutError(
                f"{path} is an AlignCLIP authors' checkpoint (one shared transformer), which "
                f"{model_name or type(model).__name__} ({type(model).__name__}) cannot load: {_use_hint(found)}")
        wanted = shapes_of_config(model.embed_dim, model.spec)
        differences = [d.format(config=config) for d in shape_differences(found, wanted)]
        if differences:
            raise CheckpointLayoutError(f"{path}: {'; '.join(differences)}: {_use_hint(found)}")
        converted = to_plugin_state_dict(state_dict)
        names = key_differences(converted, model.state_dict().keys())
        if names:
            raise CheckpointLayoutError(f"{path} is in the AlignCLIP authors' layout but its tensors do not fit "
                                        f"{config}: {names}")
        return converted
    if isinstance(model, SharedCLIP) and not is_plugin_layout(state_dict):
        first = ", ".join(list(state_dict)[:3])
        raise CheckpointLayoutError(
            f"{path} fits no checkpoint layout {model_name or 'a SharedCLIP model'} loads: neither OpenCLIP's "
            f"(with {', '.join(PLUGIN_MARKERS)}) nor the AlignCLIP authors' (with {', '.join(AUTHORS_MARKERS[:2])}); "
            f"its first tensors are {first}. Pass a checkpoint of this model, or the --model it was trained as")
    return state_dict


def _target(model, checkpoint_path, *args, **kwargs):
    return model, str(checkpoint_path)


def _model_name(model_name, *args, **kwargs):
    return model_name if isinstance(model_name, str) else None


def _adapting_load_state_dict(upstream):
    @functools.wraps(upstream)
    def load_state_dict(checkpoint_path, *args, **kwargs):
        state_dict = upstream(checkpoint_path, *args, **kwargs)
        target = _TARGET.get()
        if target is None:                    # a tower file (pretrained_image_path, ...), or a direct call
            return state_dict
        model, path = target
        return adapt_state_dict(state_dict, model, path, _MODEL_NAME.get())

    load_state_dict.__wrapped_upstream__ = upstream
    return load_state_dict


def patch_loading(open_clip_module) -> None:
    """Wrap ``load_checkpoint``, ``load_state_dict`` and ``create_model`` of ``open_clip.factory`` (idempotent).

    ``create_model`` and ``load_checkpoint`` look the other two up in the factory module at call time, so
    the wrapped ones are what OpenCLIP itself uses; the package-level names are replaced too."""
    factory = open_clip_module.factory
    if getattr(factory, _PATCHED, False):
        return
    factory.load_state_dict = _adapting_load_state_dict(factory.load_state_dict)
    factory.load_checkpoint = with_context(_TARGET, _target, factory.load_checkpoint)
    open_clip_module.load_checkpoint = factory.load_checkpoint
    factory.create_model = with_context(_MODEL_NAME, _model_name, factory.create_model)
    open_clip_module.create_model = factory.create_model
    setattr(factory, _PATCHED, True)
