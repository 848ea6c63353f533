"""Two gaps in OpenCLIP 3.3's handling of pretrained third-party towers, filled without changing
anything upstream already does right.

1. ``--lock-text-unlocked-layers N`` looks a Hugging Face model's layers up in OpenCLIP's table of
   architectures, which has no layer names for BERT: any BERT tower (MiniLM included) crashed with a
   KeyError. The two missing names are added; names upstream defines are never touched.
2. ``--lock-image-freeze-bn-stats`` turns every ``BatchNorm2d`` of a timm trunk into OpenCLIP's
   ``FrozenBatchNorm2d``. timm's EfficientNets (and other nets) fuse the activation into the norm layer
   (``BatchNormAct2d``, a ``BatchNorm2d`` subclass), so that conversion silently dropped every ReLU6:
   activations then grow without bound through the frozen layers. Matched norm layers are converted by
   timm's own ``freeze_batch_norm_2d`` instead, which keeps the activation; plain ``BatchNorm2d`` layers
   come out exactly as before.
"""
from __future__ import annotations

# BertModel: transformer.encoder.layer[i], transformer.embeddings
_HF_LAYER_NAMES = {"bert": {"layer_attr": "layer", "token_embeddings_attr": "embeddings"}}


def fill_hf_layer_names() -> None:
    from open_clip.hf_configs import arch_dict

    for arch, names in _HF_LAYER_NAMES.items():
        config_names = arch_dict.get(arch, {}).get("config_names")
        if config_names is not None:
            for key, value in names.items():
                config_names.setdefault(key, value)


def freeze_batch_norm_keeping_activation(module, module_match=None, name: str = ""):
    """OpenCLIP's ``freeze_batch_norm_2d`` contract (convert all norm layers, or those whose full name is in
    ``module_match``; return the module or its replacement), with timm's conversion for the layers."""
    from timm.layers import freeze_batch_norm_2d as timm_freeze
    from torch import nn

    is_norm = isinstance(module, (nn.modules.batchnorm.BatchNorm2d, nn.modules.batchnorm.SyncBatchNorm))
    if is_norm and (not module_match or name in module_match):
        return timm_freeze(module)
    for child_name, child in module.named_children():
        full_name = f"{name}.{child_name}" if name else child_name
        frozen = freeze_batch_norm_keeping_activation(child, module_match, full_name)
        if frozen is not child:
            module.add_module(child_name, frozen)
    return module


def patch_towers(open_clip_module) -> None:
    """Apply both fixes (idempotent)."""
    fill_hf_layer_names()
    timm_model = getattr(open_clip_module, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "freeze_batch_norm_2d"):
        timm_model.freeze_batch_norm_2d = freeze_batch_norm_keeping_activation
