"""Make OpenCLIP's model factory know the plugin's models.

Small, idempotent changes to ``open_clip.factory`` (see docs/how-it-hooks-in.md and
patches/ for the upstream change that would make them unnecessary):

1. our config directory is added with OpenCLIP's own ``add_model_config``, so ``list_models``,
   ``get_model_config`` and ``get_tokenizer`` see ``SharedCLIP-*``, ``AlignCLIP-*``, ``DualCLIP-*``;
2. the factory's module-level ``CLIP`` (what ``create_model`` instantiates for standard configs) is
   replaced by a dispatcher: a config carrying ``"model_class": "SharedCLIP"`` builds our class, any
   other config reaches the real ``open_clip.model.CLIP`` with exactly the same arguments, so every
   upstream model stays bit-identical;
3. ``get_model_config`` raises a clear error for an unknown plugin model name instead of returning
   None (which upstream turns into a list of all ~200 models, or a silent default tokenizer), and
   resolves the ``package:NAME`` tower paths of the packaged-tower configs (see
   :mod:`openclip_align.models.packaged_towers`);
4. two tower-locking gaps of OpenCLIP 3.3 are filled (:mod:`.tower_fixes`: BERT layer names,
   batch-norm freezing that keeps timm's fused activations);
5. ``create_model`` loads the packaged ImageNet weights into those configs' image towers when no full
   checkpoint is given (``pretrained=PATH`` still restores a trained model whole);
6. hub-format round trips (``open_clip.push_to_hf_hub.save_for_hf`` then ``local-dir:DIR``): a plugin
   config that plain OpenCLIP cannot build carries ``openclip_align_required`` as its first key, so
   without the plugin the model class's error names it; ``package:NAME`` placeholders stay in configs
   (no machine paths get saved) and are resolved when a model or tokenizer is built
   (:mod:`.hub_fixes` lets ``save_for_hf`` take OpenCLIP's own BPE tokenizer);
7. ``pretrained=PATH`` recognises checkpoints written by the AlignCLIP authors' code and loads them into
   the matching SharedCLIP config, or names what does not fit (:mod:`.authors_loading`).
"""
from __future__ import annotations

import contextvars
import difflib
import functools
import json

from .wrapping import CONFIG_DIR, with_context   # shared with authors_loading

PLUGIN_PREFIXES = ("SharedCLIP-", "AlignCLIP-", "DualCLIP-")
_PATCHED_FLAG = "__openclip_align_patched__"
# first key of a plugin config that plain OpenCLIP cannot build: its class then fails with
# "got an unexpected keyword argument 'openclip_align_required'", naming what is missing
REQUIRED_KEY = "openclip_align_required"
REQUIRED_NOTE = ("this model config needs the openclip-align plugin (pip install openclip-align): it uses "
                 "its SharedCLIP model class or its packaged pretrained towers")
# get_model_config resolves package:NAME placeholders only while get_tokenizer reads a config
_RESOLVE_PACKAGES = contextvars.ContextVar("openclip_align_resolve_packages", default=False)


def plugin_model_names():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


class ModelClassDispatch:
    """Stands in for ``open_clip.factory.CLIP``: routes configs with a ``model_class`` key to ours."""

    def __init__(self, upstream_clip):
        self.upstream = upstream_clip
        self.__name__ = upstream_clip.__name__
        self.__qualname__ = upstream_clip.__qualname__
        self.__doc__ = upstream_clip.__doc__

    def __call__(self, *args, model_class=None, **kwargs):
        kwargs.pop(REQUIRED_KEY, None)
        kwargs = _resolved_towers(kwargs)
        if model_class is None:
            return self.upstream(*args, **kwargs)
        return _plugin_model_class(model_class)(*args, **kwargs)

    def __instancecheck__(self, instance):  # isinstance(m, open_clip.factory.CLIP) keeps its meaning
        return isinstance(instance, self.upstream)


def _resolved_towers(kwargs: dict) -> dict:
    """The model arguments with ``package:NAME`` tower placeholders replaced by installed folders
    (a copy: the caller's config keeps its placeholders)."""
    text_cfg = kwargs.get("text_cfg")
    if not isinstance(text_cfg, dict):
        return kwargs
    from openclip_align.models.packaged_towers import has_placeholders, resolve_config

    if not has_placeholders(kwargs):
        return kwargs
    return resolve_config({**kwargs, "text_cfg": dict(text_cfg)})


def needs_plugin(config: dict) -> bool:
    """Whether plain OpenCLIP cannot build this config (plugin model class or packaged towers)."""
    from openclip_align.models.packaged_towers import has_placeholders

    return "model_class" in config or has_placeholders(config)


def _plugin_model_class(name: str):
    from openclip_align.models.shared_clip import SharedCLIP

    classes = {"SharedCLIP": SharedCLIP}
    if name not in classes:
        raise ValueError(f"unknown model_class {name!r} in model config; known: {sorted(classes)}")
    return classes[name]


def _unknown_plugin_model(name: str) -> ValueError:
    known = plugin_model_names()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"Unknown openclip-align model {name!r}.{hint} Available plugin models: {', '.join(known)}"
    )


@functools.lru_cache(maxsize=None)
def packaged_image_weights(model_name: str):
    """The packaged image weights a plugin config names (``None`` for every other model)."""
    path = CONFIG_DIR / f"{model_name}.json"
    if not isinstance(model_name, str) or not path.is_file():
        return None
    from openclip_align.models.packaged_towers import IMAGE_WEIGHTS_KEY

    return json.loads(path.read_text()).get(IMAGE_WEIGHTS_KEY)


def _checked_get_model_config(upstream_get_model_config):
    @functools.wraps(upstream_get_model_config)
    def get_model_config(model_name):
        config = upstream_get_model_config(model_name)
        if config is None and isinstance(model_name, str) and model_name.startswith(PLUGIN_PREFIXES):
            raise _unknown_plugin_model(model_name)
        if isinstance(model_name, str) and model_name.startswith(PLUGIN_PREFIXES) and config is not None:
            from openclip_align.models.packaged_towers import IMAGE_WEIGHTS_KEY

            config.pop(IMAGE_WEIGHTS_KEY, None)        # read by create_model below, not a model argument
            if needs_plugin(config) and REQUIRED_KEY not in config:
                config = {REQUIRED_KEY: REQUIRED_NOTE, **config}
        if config is not None and _RESOLVE_PACKAGES.get():
            from openclip_align.models.packaged_towers import resolve_config

            resolve_config(config)
        return config

    get_model_config.__wrapped_upstream__ = upstream_get_model_config
    return get_model_config


def _resolving_get_tokenizer(upstream_get_tokenizer):
    # the tokenizer needs the installed folder, not the placeholder
    return with_context(_RESOLVE_PACKAGES, lambda *args, **kwargs: True, upstream_get_tokenizer)


def _packaged_create_model(upstream_create_model):
    @functools.wraps(upstream_create_model)
    def create_model(model_name, pretrained=None, *args, **kwargs):
        package = packaged_image_weights(model_name) if isinstance(model_name, str) else None
        if package:
            # the packaged weights ARE this image tower's default weights: upstream's `pretrained_image`
            # (`--pretrained-image`) would have timm fetch its own from the hub instead
            kwargs["pretrained_image"] = False
        model = upstream_create_model(model_name, pretrained, *args, **kwargs)
        if package:
            from openclip_align.models.packaged_towers import load_packaged_image_weights, use_packaged_preprocess

            # as upstream's default tower weights: whenever no full checkpoint and no image-tower file is loaded
            full_checkpoint = pretrained and kwargs.get("load_weights", True)
            if not full_checkpoint and not kwargs.get("pretrained_image_path"):
                load_packaged_image_weights(model, package)
            use_packaged_preprocess(model, package, kwargs.get("force_preprocess_cfg"))
        return model

    create_model.__wrapped_upstream__ = upstream_create_model
    return create_model


def patch_open_clip(open_clip_module) -> None:
    """Apply the changes above to an imported ``open_clip`` package (idempotent)."""
    factory = open_clip_module.factory
    if getattr(factory, _PATCHED_FLAG, False):
        return
    if CONFIG_DIR not in getattr(factory, "_MODEL_CONFIG_PATHS", []):
        factory.add_model_config(CONFIG_DIR)
    if not isinstance(factory.CLIP, ModelClassDispatch):
        factory.CLIP = ModelClassDispatch(factory.CLIP)
    if not isinstance(factory.CustomTextCLIP, ModelClassDispatch):    # HF text towers: placeholders resolved
        factory.CustomTextCLIP = ModelClassDispatch(factory.CustomTextCLIP)
    checked = _checked_get_model_config(factory.get_model_config)
    factory.get_model_config = checked
    open_clip_module.get_model_config = checked
    tokenizer = _resolving_get_tokenizer(factory.get_tokenizer)
    factory.get_tokenizer = tokenizer
    open_clip_module.get_tokenizer = tokenizer
    from .hub_fixes import patch_hub
    from .tower_fixes import patch_towers

    patch_towers(open_clip_module)
    patch_hub(open_clip_module)
    packaged = _packaged_create_model(factory.create_model)
    factory.create_model = packaged                  # create_model_and_transforms looks it up here
    open_clip_module.create_model = packaged
    from .authors_loading import patch_loading

    patch_loading(open_clip_module)                  # pretrained=PATH of the AlignCLIP authors' checkpoints
    setattr(factory, _PATCHED_FLAG, True)
