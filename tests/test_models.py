"""SharedCLIP / AlignCLIP models and their registration with OpenCLIP's factory (issue 2)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import open_clip
from openclip_align.models.shared_config import SharedCLIPConfigError
from openclip_align.models.shared_clip import SharedCLIP

TINY = "AlignCLIP-Tiny"


def run_python(code: str, disable: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    if disable:
        env["OPENCLIP_ALIGN_DISABLE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return open_clip.create_model(TINY).eval()


def _inputs(model, batch=3):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, *model.visual.image_size, generator=g)
    text = open_clip.get_tokenizer(TINY)(["a red apple", "a smiling cat face", "woman technologist"][:batch])
    return image, text


def test_fresh_process_sees_models_without_importing_plugin():
    out = run_python("""
        import sys, open_clip
        names = ['AlignCLIP-ViT-B-16', 'SharedCLIP-ViT-B-16', 'AlignCLIP-ViT-B-32', 'SharedCLIP-ViT-B-32',
                 'AlignCLIP-Tiny', 'SharedCLIP-Tiny', 'AlignCLIP-Small', 'SharedCLIP-Small']
        assert all(n in open_clip.list_models() for n in names)
        for n in names[2:]:
            tok = open_clip.get_tokenizer(n)
            m, _, preprocess = open_clip.create_model_and_transforms(n)
            print(n, type(m).__name__, tuple(tok(['hi']).shape))
        m = open_clip.create_model('AlignCLIP-ViT-B-16')
        print('B16', type(m).__name__)
    """)
    assert out.returncode == 0, out.stderr
    assert "B16 SharedCLIP" in out.stdout
    assert "AlignCLIP-Tiny SharedCLIP (1, 32)" in out.stdout
    assert "SharedCLIP-ViT-B-32 SharedCLIP (1, 77)" in out.stdout


def test_switch_off_hides_models():
    out = run_python("""
        import sys, open_clip
        print('listed', 'AlignCLIP-Tiny' in open_clip.list_models(), 'plugin', 'openclip_align' in sys.modules)
        try:
            open_clip.create_model('AlignCLIP-Tiny')
        except RuntimeError as e:
            print('refused', 'not found' in str(e))
    """, disable=True)
    assert out.returncode == 0, out.stderr
    assert "listed False plugin False" in out.stdout
    assert "refused True" in out.stdout


def test_weight_sharing_is_real(tiny):
    image, text = _inputs(tiny)
    with torch.no_grad():
        img0, txt0 = tiny.encode_image(image), tiny.encode_text(text)
        tiny.transformer.resblocks[0].mlp.c_fc.weight.add_(0.05)
        img1, txt1 = tiny.encode_image(image), tiny.encode_text(text)
        assert not torch.allclose(img0, img1) and not torch.allclose(txt0, txt1)
        tiny.token_embedding.weight.add_(0.05)
        tiny.positional_embedding.add_(0.05)
        img2, txt2 = tiny.encode_image(image), tiny.encode_text(text)
    assert torch.equal(img1, img2)          # text-only weights never touch the image path
    assert not torch.allclose(txt1, txt2)


def test_one_stack_one_projection(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert not any(n.startswith(("text.", "text_projection")) for n in names)
    assert sum(n.startswith("transformer.resblocks.") and n.endswith("attn.in_proj_weight") for n in names) == 2


def hand_count(cfg):
    """Parameters of a SharedCLIP config, counted from the architecture description (docs/methods.md)."""
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    w, layers = v["width"], v["layers"]
    grid = (v["image_size"] // v["patch_size"]) ** 2
    image_stem = 3 * v["patch_size"] ** 2 * w + w + (grid + 1) * w + 2 * w   # conv, cls, pos, ln_pre
    text_stem = t["vocab_size"] * w + t["context_length"] * w
    attn = 3 * w * w + 3 * w + w * w + w
    mlp = 4 * w * w + 4 * w + 4 * w * w + w
    block = attn + mlp + 2 * (2 * w)
    return image_stem + text_stem + layers * block + 2 * w + w * e + 1     # ln_final, proj, logit_scale


def test_parameter_count_b16():
    cfg = open_clip.get_model_config("AlignCLIP-ViT-B-16")
    expected = hand_count(cfg)
    assert 123e6 < expected < 126e6          # "about 124M" in the paper
    model = open_clip.create_model("AlignCLIP-ViT-B-16")
    assert sum(p.numel() for p in model.parameters()) == expected


def test_upstream_model_bit_identical_with_and_without_plugin():
    code = """
        import torch, open_clip, sys
        torch.manual_seed(0)
        m = open_clip.create_model('ViT-S-32').eval()
        assert type(m) is open_clip.CLIP
        torch.manual_seed(1)
        image = torch.randn(2, 3, 224, 224)
        text = open_clip.get_tokenizer('ViT-S-32')(['a dog', 'a photo of a cat'])
        with torch.no_grad():
            out = torch.cat([m.encode_image(image), m.encode_text(text)]).double()
        sys.stdout.write(repr(out.flatten().tolist()))
    """
    with_plugin, without = run_python(code), run_python(code, disable=True)
    assert with_plugin.returncode == 0 and without.returncode == 0, with_plugin.stderr + without.stderr
    assert with_plugin.stdout == without.stdout and len(with_plugin.stdout) > 100


def test_forward_matches_encoders_and_logit_scale():
    model = open_clip.create_model(TINY, output_dict=True).eval()
    image, text = _inputs(model)
    with torch.no_grad():
        out = model(image, text)
        img = model.encode_image(image)
        txt = model.encode_text(text)
    assert torch.allclose(out["image_features"], img / img.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out["text_features"], txt / txt.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out["logit_scale"], torch.tensor(1 / 0.07))


def test_text_pooling_is_end_of_text_token(tiny):
    """Tokens after the end-of-text token must not change the text embedding (causal mask + argmax pool)."""
    _, text = _inputs(tiny, batch=1)
    eot = int(text.argmax(dim=-1))
    changed = text.clone()
    changed[0, eot + 1:] = 42
    with torch.no_grad():
        assert torch.allclose(tiny.encode_text(text), tiny.encode_text(changed), atol=1e-6)


def test_save_and_reload_through_pretrained_path(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": tiny.state_dict()}, path)
    reloaded = open_clip.create_model(TINY, pretrained=str(path)).eval()
    image, text = _inputs(tiny)
    with torch.no_grad():
        assert torch.equal(tiny.encode_image(image), reloaded.encode_image(image))
        assert torch.equal(tiny.encode_text(text), reloaded.encode_text(text))


def test_locks_freeze_the_shared_path(tiny):
    tiny.lock_image_tower()
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {"token_embedding.weight", "positional_embedding", "logit_scale"}
    for p in tiny.parameters():
        p.requires_grad_(True)
    tiny.lock_text_tower(unlocked_layers=1)      # last group = ln_final + proj
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert "proj.weight" in trainable and "ln_final.weight" in trainable
    assert "token_embedding.weight" not in trainable and "transformer.resblocks.1.mlp.c_fc.weight" not in trainable
    assert "visual.conv1.weight" in trainable


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    image, text = _inputs(model)

    def grads():
        model.zero_grad()
        (model.encode_image(image).sum() + model.encode_text(text).sum()).backward()
        return model.transformer.resblocks[0].attn.in_proj_weight.grad.clone()

    plain = grads()
    model.set_grad_checkpointing(True)
    assert torch.allclose(plain, grads(), atol=1e-6)


def test_low_precision_and_compile():
    model = open_clip.create_model(TINY, precision="bf16").eval()
    assert model.proj.weight.dtype == torch.bfloat16
    assert model.ln_final.weight.dtype == torch.float32
    image, text = _inputs(model)
    with torch.no_grad():
        assert model.encode_image(image.bfloat16()).dtype == torch.bfloat16
        assert torch.isfinite(model.encode_text(text).float()).all()
    model = open_clip.create_model(TINY).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled.encode_text(text), model.encode_text(text), atol=1e-5)
        assert torch.allclose(compiled(image, text)["image_features"], model(image, text)["image_features"], atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"text_cfg": {"width": 256}}, "text width (256) != vision width (128)"),
    ({"vision_cfg": {"image_size": 30}}, "image size 30 is not divisible by the patch size 8"),
])
def test_bad_configs_are_named(change, message):
    cfg = open_clip.get_model_config(TINY)
    for part, values in change.items():
        cfg[part].update(values)
    cfg.pop("model_class")
    with pytest.raises(SharedCLIPConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SharedCLIP(**cfg)


def test_unknown_plugin_model_is_named():
    with pytest.raises(ValueError, match="Unknown openclip-align model 'AlignCLIP-ViT-B-61'.*AlignCLIP-ViT-B-16"):
        open_clip.create_model("AlignCLIP-ViT-B-61")
    with pytest.raises(ValueError, match="AlignCLIP-Huge"):
        open_clip.get_tokenizer("AlignCLIP-Huge")


def test_configs_are_upstream_layout():
    cfg = open_clip.get_model_config("AlignCLIP-ViT-B-16")
    assert json.loads(json.dumps(cfg))["text_cfg"]["context_length"] == 77
    assert cfg["vision_cfg"]["patch_size"] == 16 and cfg["embed_dim"] == 768
