"""Load a model for a command (``gap``, ``convert``, the benchmark's evaluation): whatever is wrong with the
model name, the checkpoint file or the hub tag becomes one line naming it and what was expected.

Upstream's errors for these cases are tracebacks, and PyTorch's ends by advising to reload with pickle
execution allowed, which is arbitrary code execution for an untrusted file: the messages here never repeat
it. A file is looked at before it is read (its first bytes, a zip's end record: cheap at any size), so a
text file or a half-copied checkpoint is named for what it is.
"""
from __future__ import annotations

import difflib
import os
import pickle
import re
import zipfile
from typing import Optional

ZIP_MAGIC = b"PK\x03\x04"          # torch.save's default format is a zip archive
PICKLE_PROTO = 0x80                # the legacy (pre-1.6) torch.save format starts with a pickle protocol byte
EXPECTED = "a checkpoint written by torch.save (a zip archive) or a .safetensors file"
OFFLINE_HINT = ("no network here, or HF_HUB_OFFLINE=1; fetch it where there is a network (it lands in the "
                "Hugging Face cache, HF_HOME) or download the checkpoint and pass its path")


class ModelLoadError(ValueError):
    """A model that cannot be loaded for the reason the message gives (printed as one line, no traceback)."""
    user_facing = True


def one_line(text: str, limit: int = 240) -> str:
    """First line of an upstream message, cut before any advice on the unsafe reader."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    for marker in ("weights_only", "WeightsUnpickler", "Check the documentation of torch.load"):
        cut = line.find(marker)
        if cut >= 0:
            line = line[:cut].rstrip(" ,.;:(")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def explain_unreadable(path: str, flag: str, err: BaseException) -> ModelLoadError:
    """The safe reader's refusal (or a damaged pickle) as one line, with the way out that keeps it safe."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return ModelLoadError(
            f"{flag} {path}: holds a Python object ({found.group(1)}) beside its tensors, which the safe reader does "
            "not load; where it was made, save the weights alone: torch.save({'state_dict': model.state_dict()}, PATH)")
    reason = one_line(text) if "Weights only load failed" not in text else "a damaged pickle"
    return ModelLoadError(f"{flag} {path}: not a readable checkpoint ({reason or type(err).__name__}); "
                          f"expected {EXPECTED} holding tensors only")


def check_checkpoint_file(path: str, flag: str = "--pretrained") -> None:
    """Refuse a file that cannot be a checkpoint, from its size and first bytes (never unpickles anything)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"{flag} {path}: the file is empty; expected {EXPECTED}")
    if str(path).endswith(".safetensors"):
        return
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(f"{flag} {path}: a zip archive without its end ({size} bytes), so a truncated or "
                                 "damaged checkpoint; copy it again from where it was saved")
        return
    if head[0] == PICKLE_PROTO:
        return
    try:
        head.decode("utf-8")
        what = f"a text file (starts {head[:24].decode('utf-8', 'replace')!r})"
    except UnicodeDecodeError:
        what = f"not a checkpoint (starts with bytes {head[:4].hex(' ')})"
    raise ModelLoadError(f"{flag} {path}: {what}; expected {EXPECTED}")


def read_checkpoint(path: str, flag: str = "--pretrained"):
    """``torch.load`` of a checkpoint file with the safe (tensors-only) reader, its failures as one line."""
    import torch

    check_checkpoint_file(path, flag)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise explain_unreadable(path, flag, err) from None


def check_model_name(name: str, flag: str = "--model") -> None:
    """An unknown config name, with the closest known ones."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelLoadError(f"{flag} {name}: no such OpenCLIP model config; {hint}open_clip.list_models() lists them all")


def _is_fetch_failure(err: BaseException) -> bool:
    text = str(err)
    return any(marker in text for marker in ("Failed to download", "HF Hub", "LocalEntryNotFound",
                                             "cannot find the requested files", "Internet connection"))


def _unknown_tag(model: str, pretrained: str) -> Optional[str]:
    import open_clip

    if ":" in model or open_clip.get_pretrained_cfg(model, pretrained):
        return None
    tags = open_clip.list_pretrained_tags_by_model(model)
    known = f"its tags are {', '.join(tags)}" if tags else "it has no pretrained tags"
    return (f"--pretrained {pretrained}: no such file, and not a pretrained tag of {model} ({known}); "
            "pass the path of a checkpoint")


def create_model_for_command(name: str, pretrained: Optional[str] = None, **kwargs):
    """``open_clip.create_model_and_transforms(name, pretrained, **kwargs)`` with every bad-input failure as a
    :class:`ModelLoadError` naming the model, file or tag and what was expected."""
    import open_clip

    from .integration.trainer_errors import explain_checkpoint_mismatch

    check_model_name(name)
    is_file = bool(pretrained) and os.path.isfile(pretrained)
    if is_file:
        check_checkpoint_file(pretrained)
    elif pretrained:
        problem = _unknown_tag(name, pretrained)
        if problem:
            raise ModelLoadError(problem)
    try:
        return open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
    except MemoryError:
        raise
    except Exception as err:                                      # noqa: BLE001 - classified below, else re-raised
        if getattr(err, "user_facing", False):
            raise ModelLoadError(one_line(err)) from None
        if is_file and (isinstance(err, (pickle.UnpicklingError, EOFError)) or "Weights only load failed" in str(err)):
            raise explain_unreadable(pretrained, "--pretrained", err) from None
        if is_file and "Error(s) in loading state_dict" in str(err):
            raise ModelLoadError(str(explain_checkpoint_mismatch(err, name, pretrained))) from None
        if is_file:
            reason = one_line(err) or type(err).__name__
            raise ModelLoadError(f"--pretrained {pretrained} could not be loaded into --model {name} ({reason}); "
                                 f"expected {EXPECTED} of that model: pass the --model it was trained with") from None
        if _is_fetch_failure(err):
            what = f"--pretrained {pretrained} of {name}" if pretrained else f"--model {name}"
            raise ModelLoadError(f"{what}: cannot be fetched from the Hugging Face hub ({OFFLINE_HINT})") from None
        raise


def explain_encoder_error(name: str, err: OSError) -> str:
    """A sentence-transformers encoder that did not load (``embed --model``), as one line."""
    text = str(err)
    if isinstance(err, NotADirectoryError) or (os.path.isfile(name) and not os.path.isdir(name)):
        return (f"--model {name} is a file; expected a sentence-transformers model folder (with modules.json) "
                "or a model name such as all-mpnet-base-v2")
    if any(marker in text for marker in ("huggingface.co", "couldn't connect", "Internet", "offline")):
        return (f"--model {name}: cannot be fetched from the Hugging Face hub (no network here, or "
                "HF_HUB_OFFLINE=1); fetch it where there is a network, or pass a local model folder")
    return f"--model {name}: cannot be loaded ({one_line(text) or type(err).__name__})"
