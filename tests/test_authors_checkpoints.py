"""Checkpoints written by the AlignCLIP authors' code load through OpenCLIP's ordinary API (issue 24).

The files here are built the way their code lays them out (align_clip/model.py, transformer.py: names and
shapes), with random values, and saved in their training script's dict. The expectations do not come from
the converter: where each tensor must land is written out below, and the embeddings are computed straight
from the raw tensors with torch.nn.functional (patch conv, class token, positional embedding, ln_pre, the
blocks with attention written from the q/k/v weights, ln_post, ``x @ projection``).
"""
import json
import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from _authors_files import TINY, save_as_their_script, their_state_dict

SOT, EOT = 49406, 49407
# their three configs, as their model_configs/*.json state them (the head count is width / 64 = 12)
AUTHORS_SHAPES = {
    "AlignCLIP-Authors-ViT-B-16": dict(width=768, layers=12, embed_dim=768, image_size=224, patch_size=16,
                                       context_length=77),
    "AlignCLIP-Authors-ViT-B-16-512": dict(width=768, layers=12, embed_dim=512, image_size=224, patch_size=16,
                                           context_length=77),
    "AlignCLIP-Authors-ViT-L-16": dict(width=768, layers=16, embed_dim=768, image_size=224, patch_size=16,
                                       context_length=77),
}
# where their top-level tensors must land in SharedCLIP (transformer.* and visual.* keep their names)
RENAMES = {"text.token_embedding.weight": "token_embedding.weight", "text.positional_embedding": "positional_embedding",
           "ln_post.weight": "ln_final.weight", "ln_post.bias": "ln_final.bias", "logit_scale": "logit_scale"}


# --- their forward pass, from the raw tensors ----------------------------------------------------------
def block(x, sd, i, heads, mask=None):
    p = f"transformer.resblocks.{i}."
    n, length, width = x.shape
    h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(width, dim=-1)
    q, k, v = (z.reshape(n, length, heads, width // heads).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + attended @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def their_image_embedding(sd, images, layers, heads):
    """Unnormalised, as their encode_image(normalize=False)."""
    conv = sd["visual.conv1.weight"]
    width = conv.shape[0]
    x = F.conv2d(images, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(images), 1, width), x], dim=1)
    x = F.layer_norm(x + sd["visual.positional_embedding"], (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(layers):
        x = block(x, sd, i, heads)
    return F.layer_norm(x[:, 0], (width,), sd["ln_post.weight"], sd["ln_post.bias"]) @ sd["projection"]


def their_text_embedding(sd, tokens, layers, heads):
    """Unnormalised: final LayerNorm at the end-of-text token (the largest id), then ``@ projection``."""
    width = sd["projection"].shape[0]
    length = tokens.shape[1]
    x = sd["text.token_embedding.weight"][tokens] + sd["text.positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(layers):
        x = block(x, sd, i, heads, mask=causal)
    x = F.layer_norm(x, (width,), sd["ln_post.weight"], sd["ln_post.bias"])
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ sd["projection"]


def some_tokens(context_length, lengths=(3, 9, 17), seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0] = SOT
        tokens[row, 1:n - 1] = torch.randint(1, SOT, (n - 2,), generator=gen)
        tokens[row, n - 1] = EOT
    return tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sd = their_state_dict(**TINY)
    return sd, save_as_their_script(sd, tmp_path_factory.mktemp("authors") / "alignclip_tiny.pt")


def test_every_tensor_lands_where_the_mapping_says(tiny):
    sd, path = tiny
    loaded = open_clip.create_model("AlignCLIP-Tiny", pretrained=str(path)).state_dict()
    landed = set()
    for key, value in sd.items():
        if key == "text.text_projection":
            continue                                                  # unused by their model: not loaded
        ours = "proj.weight" if key == "projection" else RENAMES.get(key, key)
        expected = value.T if key == "projection" else value
        assert torch.equal(loaded[ours], expected), key
        landed.add(ours)
    assert landed == set(loaded)                                      # and nothing of ours left at random


def test_embeddings_equal_those_computed_from_their_tensors(tiny):
    """Unnormalised encode_image / encode_text (and forward's normalised features) against their formulas."""
    sd, path = tiny
    model = open_clip.create_model("AlignCLIP-Tiny", pretrained=str(path)).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = some_tokens(TINY["context_length"])
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        out = model(images, tokens)
    expected_image = their_image_embedding(sd, images, layers=2, heads=2)
    expected_text = their_text_embedding(sd, tokens, layers=2, heads=2)
    assert torch.allclose(image, expected_image, atol=1e-5, rtol=1e-4)
    assert torch.allclose(text, expected_text, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out["image_features"], F.normalize(expected_image, dim=-1), atol=1e-6)
    assert torch.allclose(out["text_features"], F.normalize(expected_text, dim=-1), atol=1e-6)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert expected_image.std() > 0.1 and (expected_text[0] - expected_text[1]).abs().max() > 0.1   # not degenerate


def test_a_module_prefix_is_handled(tiny, tmp_path):
    sd, _ = tiny
    path = save_as_their_script(sd, tmp_path / "ddp.pt", prefix="module.")
    loaded = open_clip.create_model("AlignCLIP-Tiny", pretrained=str(path)).state_dict()
    assert torch.equal(loaded["ln_final.weight"], sd["ln_post.weight"])
    assert torch.equal(loaded["proj.weight"], sd["projection"].T)


def test_a_bare_state_dict_of_theirs_loads_too(tiny, tmp_path):
    sd, _ = tiny
    torch.save(sd, tmp_path / "bare.pt")
    loaded = open_clip.create_model("SharedCLIP-Tiny", pretrained=str(tmp_path / "bare.pt")).state_dict()
    assert torch.equal(loaded["token_embedding.weight"], sd["text.token_embedding.weight"])


def test_the_wrong_config_is_an_error_naming_what_differs(tmp_path):
    small = save_as_their_script(their_state_dict(**{**TINY, "embed_dim": 64}), tmp_path / "embed64.pt")
    with pytest.raises(ValueError, match=r"projection is 128x64 in the file, the config AlignCLIP-Tiny wants "
                                         r"128x128: no plugin config has its shapes"):
        open_clip.create_model("AlignCLIP-Tiny", pretrained=str(small))
    deeper = save_as_their_script(their_state_dict(**{**TINY, "layers": 3, "context_length": 16}), tmp_path / "l3.pt")
    with pytest.raises(ValueError, match=r"transformer.resblocks has 3 blocks in the file, the config AlignCLIP-Tiny "
                                         r"wants 2; text.positional_embedding has 16 tokens in the file"):
        open_clip.create_model("AlignCLIP-Tiny", pretrained=str(deeper))


def test_their_shapes_in_the_wrong_authors_config_name_the_right_one(tmp_path):
    path = save_as_their_script(their_state_dict(**AUTHORS_SHAPES["AlignCLIP-Authors-ViT-B-16-512"], fill=0.01),
                                tmp_path / "b16_512.pt")
    with pytest.raises(ValueError, match=r"projection is 768x512 in the file, the config AlignCLIP-Authors-ViT-B-16 "
                                         r"wants 768x768: use AlignCLIP-Authors-ViT-B-16-512$"):
        open_clip.create_model("AlignCLIP-Authors-ViT-B-16", pretrained=str(path))


@pytest.mark.parametrize("name", sorted(AUTHORS_SHAPES))
def test_each_of_their_shapes_loads_into_its_config_with_their_preprocessing(name, tmp_path):
    """Their three shapes; their eval transform (OpenAI mean/std, bicubic shortest-side resize, centre crop)
    and tokenizer (OpenAI CLIP BPE, 77 tokens) are OpenCLIP's defaults, which these configs keep."""
    path = save_as_their_script(their_state_dict(**AUTHORS_SHAPES[name], fill=0.01), tmp_path / "theirs.pt")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    assert model.proj.weight.shape == (AUTHORS_SHAPES[name]["embed_dim"], 768)
    assert len(model.transformer.resblocks) == AUTHORS_SHAPES[name]["layers"]
    assert model.transformer.resblocks[0].attn.num_heads == 12
    assert torch.all(model.proj.weight == 0.01)
    resize, crop, *_, normalize = preprocess.transforms
    assert resize.size == 224 and resize.interpolation.value == "bicubic" and crop.size == (224, 224)
    assert tuple(normalize.mean) == open_clip.OPENAI_DATASET_MEAN and tuple(normalize.std) == open_clip.OPENAI_DATASET_STD
    tokenizer = open_clip.get_tokenizer(name)
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) and tokenizer.context_length == 77
    assert tokenizer(["A Photo"]).tolist() == tokenizer(["a photo"]).tolist()         # lower-cased, as theirs


def test_a_file_of_no_known_layout_is_an_error(tmp_path, tiny):
    dual = tmp_path / "dual.pt"
    torch.save({"state_dict": open_clip.create_model("DualCLIP-Tiny").state_dict()}, dual)
    with pytest.raises(ValueError, match=r"dual.pt fits no checkpoint layout AlignCLIP-Tiny loads: neither "
                                         r"OpenCLIP's .* nor the AlignCLIP authors'"):
        open_clip.create_model("AlignCLIP-Tiny", pretrained=str(dual))
    with pytest.raises(ValueError, match=r"AlignCLIP authors' checkpoint .* DualCLIP-Tiny \(CLIP\) cannot load: "
                                         r"use AlignCLIP-Tiny \(or SharedCLIP-Tiny\)"):
        open_clip.create_model("DualCLIP-Tiny", pretrained=str(tiny[1]))
    partial = {k: v for k, v in tiny[0].items() if not k.startswith("visual.ln_pre")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks visual.ln_pre.weight, visual.ln_pre.bias"):
        open_clip.create_model("AlignCLIP-Tiny", pretrained=str(tmp_path / "partial.pt"))


def test_openclip_layout_checkpoints_load_as_before(tmp_path):
    for name in ("AlignCLIP-Tiny", "DualCLIP-Tiny"):
        torch.manual_seed(3)
        state = open_clip.create_model(name).state_dict()
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / f"{name}.pt")
        loaded = open_clip.create_model(name, pretrained=str(tmp_path / f"{name}.pt")).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def convert(*argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "openclip_align.cli", "convert", *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_round_trip(tiny, tmp_path):
    sd, path = tiny
    out = tmp_path / "openclip.pt"
    done = convert("--from-authors", str(path), "--model", "AlignCLIP-Tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert set(written) == {"state_dict"}
    assert torch.equal(written["state_dict"]["proj.weight"], sd["projection"].T)
    assert torch.equal(written["state_dict"]["ln_final.bias"], sd["ln_post.bias"])
    assert "text.text_projection" not in written["state_dict"]

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = some_tokens(TINY["context_length"], lengths=(4, 12))
    hf_dir = tmp_path / "hub"
    done = convert("--from-authors", str(path), "--model", "AlignCLIP-Tiny", "--hf-dir", str(hf_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads((hf_dir / "open_clip_config.json").read_text())["preprocess_cfg"]["mean"] == \
        list(open_clip.OPENAI_DATASET_MEAN)
    for pretrained in (str(out), None):
        model = (open_clip.create_model("AlignCLIP-Tiny", pretrained=pretrained) if pretrained
                 else open_clip.create_model(f"local-dir:{hf_dir}")).eval()
        with torch.no_grad():
            assert torch.allclose(model.encode_image(images), their_image_embedding(sd, images, 2, 2), atol=1e-5)
            assert torch.allclose(model.encode_text(tokens), their_text_embedding(sd, tokens, 2, 2), atol=1e-5)


def test_convert_refuses_what_it_cannot_do_and_keeps_existing_files(tiny, tmp_path):
    _, path = tiny
    existing = tmp_path / "kept.pt"
    existing.write_bytes(b"earlier")
    done = convert("--from-authors", str(path), "--model", "AlignCLIP-Tiny", "--out", str(existing))
    assert done.returncode == 2 and "exists" in done.stderr and existing.read_bytes() == b"earlier"
    done = convert("--from-authors", str(path), "--model", "AlignCLIP-Small", "--out", str(tmp_path / "x.pt"))
    assert done.returncode == 2 and "projection is 128x128 in the file" in done.stderr
    assert "use AlignCLIP-Tiny" in done.stderr and not (tmp_path / "x.pt").exists()
    torch.save({"state_dict": open_clip.create_model("AlignCLIP-Tiny").state_dict()}, tmp_path / "ours.pt")
    done = convert("--from-authors", str(tmp_path / "ours.pt"), "--model", "AlignCLIP-Tiny", "--out", str(tmp_path / "y.pt"))
    assert done.returncode == 2 and "not in the AlignCLIP authors' layout" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.pt", "ours.pt"]        # no temporary left behind
