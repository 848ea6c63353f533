"""SharedCLIP: one transformer for images and text (Eslami & de Melo, ICLR 2025).

Both modalities run through the SAME pre-LN transformer stack, the same final LayerNorm and the
same projection to the embedding space. Only the input stems are per modality:

* image: Conv2d patch embedding (no bias), class token, learned positional embedding, a LayerNorm
  before the stack, no attention mask; pooled as final-LN(class token);
* text: token embedding, learned positional embedding, causal attention mask, no pre-LN; pooled as
  final-LN at the end-of-text token (the position of the largest token id).

The module mirrors the interface OpenCLIP's trainer and tools expect from ``open_clip.CLIP``
(``encode_image``, ``encode_text``, ``logit_scale``, the tower locks, gradient checkpointing;
``forward`` returns a dict, as upstream requires of every class other than CLIP/CustomTextCLIP) so it can be trained by ``open_clip_train.main`` unchanged. The
building blocks (``Transformer``, ``LayerNorm``, ``PatchDropout``, ``text_global_pool``) are
OpenCLIP's own.
"""
import math
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from open_clip.transformer import (
    LayerNorm, LayerNormFp32, PatchDropout, QuickGELU, Transformer, text_global_pool,
)

from .shared_config import SharedTowerSpec, parse_shared_config


class ImageStem(nn.Module):
    """Turns an image into the token sequence the shared stack consumes.

    Lives at ``model.visual`` and carries ``image_size`` / ``patch_size`` / ``grid_size`` because
    OpenCLIP reads them there (preprocessing size, positional-embedding resizing on load).
    """

    def __init__(self, spec: SharedTowerSpec, norm_layer):
        super().__init__()
        self.image_size = (spec.image_size, spec.image_size)
        self.patch_size = (spec.patch_size, spec.patch_size)
        self.grid_size = (spec.image_size // spec.patch_size, spec.image_size // spec.patch_size)
        width = spec.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n_tokens = self.grid_size[0] * self.grid_size[1] + 1
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_tokens, width))
        self.patch_dropout = PatchDropout(spec.patch_dropout) if spec.patch_dropout > 0 else nn.Identity()
        self.ln_pre = norm_layer(width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image)                                   # B, W, gh, gw
        x = x.flatten(2).transpose(1, 2)                        # B, gh*gw, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.patch_dropout(x)                               # keeps the class token
        return self.ln_pre(x)


class SharedCLIP(nn.Module):
    """CLIP with one transformer, final LayerNorm and projection shared by image and text."""

    output_dict: torch.jit.Final[bool]

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: Dict[str, Any],
        text_cfg: Dict[str, Any],
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: Optional[float] = None,
        cast_dtype: Optional[torch.dtype] = None,
        output_dict: bool = False,
        name: str = "SharedCLIP",
        openclip_align_required: Optional[str] = None,   # the configs' marker for plain OpenCLIP; unused
    ):
        super().__init__()
        spec = parse_shared_config(embed_dim, vision_cfg, text_cfg, name=name)
        self.spec = spec
        self.output_dict = output_dict
        self.embed_dim = embed_dim
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm
        act_layer = QuickGELU if quick_gelu else nn.GELU

        self.visual = ImageStem(spec, norm_layer)

        self.context_length = spec.context_length
        self.vocab_size = spec.vocab_size
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, spec.width))
        self.register_buffer("attn_mask", _causal_mask(spec.context_length), persistent=False)

        self.transformer = Transformer(
            width=spec.width,
            layers=spec.layers,
            heads=spec.heads,
            mlp_ratio=spec.mlp_ratio,
            act_layer=act_layer,
            norm_layer=norm_layer,
        )
        self.ln_final = norm_layer(spec.width)
        self.proj = nn.Linear(spec.width, embed_dim, bias=False)

        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones([]) * init_logit_bias) if init_logit_bias is not None else None
        self._init_parameters()

    def _init_parameters(self) -> None:
        # GPT-2 / CLIP style: residual projections scaled down with depth so the stack starts stable.
        width, layers = self.spec.width, self.spec.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.proj.weight, std=attn_std)

    # --- encoders -------------------------------------------------------------------------
    def _project(self, pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
        features = self.proj(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)
        x = self.transformer(x)
        pooled = self.ln_final(x[:, 0])
        return self._project(pooled, normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if text.shape[-1] > self.context_length:
            raise ValueError(
                f"text has {text.shape[-1]} tokens but this model's context length is {self.context_length}; "
                "tokenize with open_clip.get_tokenizer(model_name)"
            )
        cast_dtype = self.transformer.get_cast_dtype()
        seq_len = text.shape[1]
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[:seq_len].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:seq_len, :seq_len])
        x = self.ln_final(x)
        pooled = text_global_pool(x, text, pool_type="argmax")
        return self._project(pooled, normalize)

    def get_logits(self, image: torch.Tensor, text: torch.Tensor):
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.T
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.T

    def forward(self, image: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None) -> Dict[str, Optional[torch.Tensor]]:
        """Always a dict, as OpenCLIP's contract for every model class other than ``CLIP`` and
        ``CustomTextCLIP`` (CoCa does the same): only those two may return a tuple when
        ``output_dict`` is False, so callers (the trainer, CLIP_benchmark, upstream's own tests)
        must read SharedCLIP's outputs by key. ``output_dict`` is kept as an attribute because
        ``create_model(..., output_dict=True)`` passes it."""
        out: Dict[str, Optional[torch.Tensor]] = {
            "image_features": self.encode_image(image, normalize=True) if image is not None else None,
            "text_features": self.encode_text(text, normalize=True) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    # --- trainer hooks --------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"positional_embedding", "visual.class_embedding", "visual.positional_embedding", "logit_scale"}

    def _shared_groups(self):
        """The shared path, input to output: one group per transformer block, then ln_final + proj."""
        return [*self.transformer.resblocks, nn.ModuleList([self.ln_final, self.proj])]

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze everything the IMAGE path uses: its stem AND the shared stack, final LN, projection.

        In a shared model the "image tower" includes the shared layers, so locking it also fixes
        them for text; only the text stem (token + positional embedding) stays trainable.
        ``unlocked_groups`` re-enables the last N groups of [image stem, block 1..L, ln_final+proj].
        """
        _lock_groups([self.visual, *self._shared_groups()], unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze everything the TEXT path uses: its embeddings AND the shared stack, final LN, proj.

        The image stem stays trainable. ``unlocked_layers`` re-enables the last N groups of
        [text embeddings, block 1..L, ln_final+proj]; ``freeze_layer_norm=False`` keeps every
        LayerNorm of the frozen groups trainable, as OpenCLIP's text lock does.
        """
        text_stem = _ParamGroup(self.token_embedding, self.positional_embedding)
        groups = [text_stem, *self._shared_groups()]
        _lock_groups(groups, unlocked_layers)
        if not freeze_layer_norm:
            for group in groups:
                for module in group.modules():
                    if isinstance(module, nn.LayerNorm):
                        module.requires_grad_(True)


class _ParamGroup(nn.Module):
    """Lets a loose parameter and a module be frozen together (not registered on the model)."""

    def __init__(self, *members):
        super().__init__()
        self._members = members

    def requires_grad_(self, requires_grad: bool = True):
        for member in self._members:
            member.requires_grad_(requires_grad)
        return self

    def modules(self):
        for member in self._members:
            if isinstance(member, nn.Module):
                yield from member.modules()


def _lock_groups(groups, unlocked: int) -> None:
    if unlocked < 0 or unlocked > len(groups):
        raise ValueError(f"unlocked groups must be between 0 and {len(groups)}, got {unlocked}")
    for i, group in enumerate(groups):
        group.requires_grad_(i >= len(groups) - unlocked)


def _causal_mask(length: int) -> torch.Tensor:
    # additive mask: -inf above the diagonal, so token i only attends to tokens <= i
    return torch.full((length, length), float("-inf")).triu_(1)
