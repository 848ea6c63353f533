"""Bad model input at the commands (``gap``, ``convert``): one line naming the file or tag and what was expected,
never a traceback, never the advice to load with pickle execution allowed."""
import argparse
import pytest
import torch

from openclip_align.cli import main
from openclip_align.model_loading import ModelLoadError, check_checkpoint_file, read_checkpoint

UNSAFE_ADVICE = "weights_only=False"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoint-like files, each wrong in one way, and one real state dict of SharedCLIP-Tiny."""
    import open_clip

    root = tmp_path_factory.mktemp("bad_checkpoints")
    gen = torch.Generator().manual_seed(0)
    (root / "garbage.pt").write_bytes(bytes(torch.randint(1, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()))
    (root / "notes.pt").write_text("epoch 3 looked fine\n")
    (root / "empty.pt").write_bytes(b"")
    torch.manual_seed(0)
    model = open_clip.create_model("SharedCLIP-Tiny")
    torch.save({"state_dict": model.state_dict()}, root / "tiny.pt")
    whole = (root / "tiny.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, root / "with_args.pt")
    (root / "pairs.csv").write_text("filepath\ttitle\n")          # never read: the model is refused first
    return root


def _one_line_error(err: str, prefix: str, *named):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err and UNSAFE_ADVICE not in err and "weights_only" not in err
    for name in named:
        assert str(name) in lines[0], (name, err)
    return lines[0]


@pytest.mark.parametrize("name,what", [
    ("garbage.pt", "not a checkpoint"),
    ("notes.pt", "a text file"),
    ("empty.pt", "empty"),
    ("truncated.pt", "truncated"),
    ("with_args.pt", "argparse.Namespace"),
])
def test_gap_refuses_a_file_that_is_not_a_checkpoint(files, tmp_path, capsys, name, what):
    rc = main(["gap", "--model", "SharedCLIP-Tiny", "--pretrained", str(files / name), "--data",
               str(files / "pairs.csv"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0
    line = _one_line_error(capsys.readouterr().err, "openclip-align gap: error:", files / name, what)
    assert "--pretrained" in line
    assert not (tmp_path / "o").exists()


def test_gap_refuses_a_checkpoint_of_another_shape(files, tmp_path, capsys):
    """SharedCLIP-Tiny's weights given for DualCLIP-Tiny: the message names the file, the model and the fix."""
    rc = main(["gap", "--model", "DualCLIP-Tiny", "--pretrained", str(files / "tiny.pt"), "--data",
               str(files / "pairs.csv"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0
    line = _one_line_error(capsys.readouterr().err, "openclip-align gap: error:", files / "tiny.pt", "DualCLIP-Tiny")
    assert "--model" in line and "trained with" in line


def test_gap_refuses_an_unknown_tag_before_any_download(files, tmp_path, capsys):
    rc = main(["gap", "--model", "ViT-B-32", "--pretrained", "laion2b_nonesuch", "--data", str(files / "pairs.csv"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0
    line = _one_line_error(capsys.readouterr().err, "openclip-align gap: error:", "laion2b_nonesuch", "ViT-B-32")
    assert "openai" in line                                     # the model's real tags are listed


@pytest.mark.parametrize("flags,named", [
    (["--model", "ViT-B-32", "--pretrained", "openai"], "openai"),
    (["--model", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"], "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
])
def test_gap_offline_hub_tag_is_one_line(files, tmp_path, monkeypatch, capsys, flags, named):
    """Offline (HF_HUB_OFFLINE) with an empty hub cache: the tag cannot be fetched."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rc = main(["gap", *flags, "--data", str(files / "pairs.csv"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and UNSAFE_ADVICE not in err
    errors = [line for line in err.splitlines() if line.startswith("openclip-align gap: error:")]
    assert len(errors) == 1, err
    assert named in errors[0] and "cannot be fetched" in errors[0] and "HF_HUB_OFFLINE" in errors[0]


@pytest.mark.parametrize("name,what", [("garbage.pt", "not a checkpoint"), ("notes.pt", "a text file"),
                                       ("truncated.pt", "truncated"), ("with_args.pt", "argparse.Namespace")])
def test_convert_refuses_a_file_that_is_not_a_checkpoint(files, tmp_path, capsys, name, what):
    out = tmp_path / "converted.pt"
    rc = main(["convert", "--from-authors", str(files / name), "--model", "AlignCLIP-Authors-ViT-B-16",
               "--out", str(out)])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "openclip-align convert: error:", files / name, what)
    assert not out.exists()


def test_convert_refuses_an_unknown_model(files, tmp_path, capsys):
    rc = main(["convert", "--from-authors", str(files / "tiny.pt"), "--model", "AlignCLIP-Authors-ViT-B-17",
               "--out", str(tmp_path / "c.pt")])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "openclip-align convert: error:", "AlignCLIP-Authors-ViT-B-17",
                    "AlignCLIP-Authors-ViT-B-16")


def test_read_checkpoint_accepts_the_real_formats_and_refuses_the_rest(files, tmp_path):
    """The helper alone: zip, legacy pickle and safetensors read; every bad file a ModelLoadError naming it."""
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "legacy.pt", tmp_path / "w.safetensors"):
        assert torch.equal(read_checkpoint(str(path))["w"], tensors["w"])
    assert read_checkpoint(str(files / "tiny.pt"))["state_dict"]
    for name in ("garbage.pt", "notes.pt", "empty.pt", "truncated.pt", "with_args.pt"):
        with pytest.raises(ModelLoadError, match=str(files / name)) as info:
            read_checkpoint(str(files / name), flag="--resume")
        assert str(info.value).startswith("--resume ") and "\n" not in str(info.value)
        assert "weights_only" not in str(info.value)
    check_checkpoint_file(str(files / "tiny.pt"))               # the header check passes a real file


@pytest.mark.parametrize("name,what", [("garbage.pt", "not a checkpoint"), ("notes.pt", "a text file"),
                                       ("with_args.pt", "argparse.Namespace")])
def test_study_start_refuses_a_file_that_is_not_a_checkpoint(files, tmp_path, name, what):
    """``study --temperatures --start FILE`` reads the start's logit scale with the safe reader, before any run."""
    with pytest.raises(SystemExit) as info:
        main(["study", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--temperatures", "0.1",
              "--start", str(files / name)])
    message = str(info.value.code)
    assert str(files / name) in message and what in message and "--start" in message
    assert "\n" not in message and "weights_only" not in message
    assert not (tmp_path / "o").exists()


def test_embed_refuses_a_model_that_is_a_file(files, tmp_path, capsys):
    csv = tmp_path / "captions.csv"
    csv.write_text("title\na red square\n")
    assert main(["embed", "--data", str(csv), "--model", str(files / "garbage.pt"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "openclip-align embed:", files / "garbage.pt", "model folder")
    assert not list(tmp_path.glob("*.npy"))


def test_an_encoder_that_cannot_be_fetched_is_one_line():
    from openclip_align.model_loading import explain_encoder_error

    err = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                  "the cached files.\nCheck your internet connection or see how to run the library in offline mode")
    line = explain_encoder_error("sentence-transformers/nonesuch", err)
    assert "\n" not in line and "sentence-transformers/nonesuch" in line and "cannot be fetched" in line
