"""Let OpenCLIP 3.3's hub-format writer save models that use its own BPE tokenizer.

``open_clip.push_to_hf_hub.save_for_hf`` (and ``push_to_hf_hub``) end with
``tokenizer.save_pretrained(DIR)``, which only ``HFTokenizer`` / ``SigLipTokenizer`` have: with the
``SimpleTokenizer`` of every CLIP-tokenizer model (upstream ViT-B-32 as much as AlignCLIP-Tiny) the
writer stops with an AttributeError after the weights and before the config. Nothing needs saving for
that tokenizer (its vocabulary ships inside open_clip, and ``get_tokenizer('local-dir:DIR')`` rebuilds
it from the saved ``text_cfg``), so the plugin gives it a ``save_pretrained`` that writes nothing.
"""
from __future__ import annotations


def _save_nothing(self, dest) -> None:
    """OpenCLIP's BPE vocabulary is part of open_clip itself: a saved model folder needs no copy."""


def patch_hub(open_clip_module) -> None:
    """Add ``SimpleTokenizer.save_pretrained`` when this OpenCLIP lacks it (idempotent)."""
    tokenizer_cls = open_clip_module.tokenizer.SimpleTokenizer
    if not hasattr(tokenizer_cls, "save_pretrained"):
        tokenizer_cls.save_pretrained = _save_nothing
