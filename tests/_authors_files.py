"""Checkpoint files laid out as the AlignCLIP authors' code writes them (their names, shapes and training-script
dict), with random values: for tests/test_authors_checkpoints.py and the README's authors' commands."""
import math

import torch

# AlignCLIP-Tiny's shapes (their code derives heads as width / 64: 2 here)
TINY = dict(width=128, layers=2, embed_dim=128, image_size=32, patch_size=8, context_length=32)


def their_state_dict(width, layers, embed_dim, image_size, patch_size, context_length, vocab_size=49408,
                     seed=0, fill=None):
    """A state dict named and shaped as their CLIP's: random values (``fill``: one value, stored as an
    expanded view so that full-size files stay small)."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.05, offset=0.0):
        if fill is not None:
            return torch.full((1,), fill).expand(*shape)
        return offset + scale * torch.randn(*shape, generator=gen)

    grid = image_size // patch_size
    sd = {}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        sd.update({
            block + "ln_1.weight": t(width, scale=0.1, offset=1.0), block + "ln_1.bias": t(width),
            block + "attn.in_proj_weight": t(3 * width, width, scale=width ** -0.5),
            block + "attn.in_proj_bias": t(3 * width),
            block + "attn.out_proj.weight": t(width, width, scale=width ** -0.5), block + "attn.out_proj.bias": t(width),
            block + "ln_2.weight": t(width, scale=0.1, offset=1.0), block + "ln_2.bias": t(width),
            block + "mlp.c_fc.weight": t(4 * width, width, scale=width ** -0.5), block + "mlp.c_fc.bias": t(4 * width),
            block + "mlp.c_proj.weight": t(width, 4 * width, scale=(4 * width) ** -0.5),
            block + "mlp.c_proj.bias": t(width),
        })
    sd.update({
        "visual.conv1.weight": t(width, 3, patch_size, patch_size, scale=0.1),
        "visual.class_embedding": t(width, scale=0.5),
        "visual.positional_embedding": t(grid * grid + 1, width, scale=0.5),
        "visual.ln_pre.weight": t(width, scale=0.1, offset=1.0), "visual.ln_pre.bias": t(width),
        # their TextEncoder makes text_projection with torch.empty and never uses it: NaN proves it stays unused
        "text.text_projection": torch.full((width, embed_dim), float("nan")),
        "text.token_embedding.weight": t(vocab_size, width, scale=0.5),
        "text.positional_embedding": t(context_length, width, scale=0.5),
        "ln_post.weight": t(width, scale=0.1, offset=1.0), "ln_post.bias": t(width),
        "projection": t(width, embed_dim, scale=width ** -0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    })
    return sd


def save_as_their_script(state_dict, path, prefix=""):
    """Their main/run.py checkpoint dict (with a real AdamW state in it)."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    torch.save({"epoch": 2, "name": "alignclip-run", "state_dict": {prefix + k: v for k, v in state_dict.items()},
                "optimizer": optimizer.state_dict()}, path)
    return path
