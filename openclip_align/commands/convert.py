"""``openclip-align convert``: an AlignCLIP authors' checkpoint as an OpenCLIP checkpoint or hub folder.

    openclip-align convert --from-authors THEIRS.pt --model AlignCLIP-Authors-ViT-B-16 --out OURS.pt
    openclip-align convert --from-authors THEIRS.pt --model AlignCLIP-Authors-ViT-B-16 --hf-dir DIR

``pretrained=THEIRS.pt`` already loads their file anywhere the plugin is installed; a converted file is
for sharing and for tools that read state dicts themselves. ``--out`` writes ``{"state_dict": ...}`` under
SharedCLIP's names (what ``pretrained=`` and the trainer's ``--pretrained`` read); ``--hf-dir`` writes
OpenCLIP's hub folder (``save_for_hf``: weights, tokenizer, config with the preprocessing), loaded with
``local-dir:DIR``. The file is checked against the config as ``pretrained=`` checks it: one that does not fit
is refused with what differs, and nothing is written.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="write an AlignCLIP authors' checkpoint as an OpenCLIP checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("--from-authors", required=True, metavar="FILE",
                   help="checkpoint saved by the AlignCLIP authors' code ({'epoch', 'state_dict', ...})")
    p.add_argument("--model", required=True,
                   help="plugin config of its shape: AlignCLIP-Authors-ViT-B-16 (embed 768), "
                        "AlignCLIP-Authors-ViT-B-16-512 (embed 512), AlignCLIP-Authors-ViT-L-16 (16 layers)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="PATH", help="OpenCLIP-layout checkpoint to write (must not exist)")
    out.add_argument("--hf-dir", metavar="DIR", help="OpenCLIP hub folder to write (must not exist, or be empty)")
    p.set_defaults(func=run)


def _refuse_existing(args) -> str:
    source = Path(args.from_authors)
    if not source.is_file():
        return f"--from-authors {source}: no such file"
    if args.out:
        target = Path(args.out)
        if target.exists():
            return f"--out {target} exists: choose a new path (an existing file is never replaced)"
    else:
        target = Path(args.hf_dir)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            return f"--hf-dir {target} exists and is not an empty folder: choose a new one"
    return ""


def _write_hf_dir(model, name: str, target: Path) -> None:
    """save_for_hf into a sibling temporary folder, renamed onto ``target`` once complete."""
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    from ..atomic_files import TMP_MARK, fsync_dir

    tmp = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")
    try:
        save_for_hf(model, open_clip.get_tokenizer(name), open_clip.get_model_config(name), str(tmp))
        if target.exists():
            target.rmdir()                                   # checked empty above
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> int:
    problem = _refuse_existing(args)
    if problem:
        print(f"openclip-align convert: error: {problem}", file=sys.stderr)
        return 2
    import open_clip
    import torch

    from ..atomic_files import atomic_open
    from ..models.authors_layout import CheckpointLayoutError, is_authors_layout

    from ..integration.authors_loading import adapt_state_dict

    from ..model_loading import ModelLoadError, check_checkpoint_file, check_model_name, explain_unreadable

    # read once with upstream's reader (the checkpoint dict, a `module.` prefix), then map and check
    try:
        check_model_name(args.model)
        check_checkpoint_file(args.from_authors, "--from-authors")
        try:
            source = open_clip.factory.load_state_dict.__wrapped_upstream__(args.from_authors)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
            raise explain_unreadable(args.from_authors, "--from-authors", err) from None
    except ModelLoadError as err:
        print(f"openclip-align convert: error: {err}", file=sys.stderr)
        return 2
    if not is_authors_layout(source):
        print(f"openclip-align convert: error: {args.from_authors} is not in the AlignCLIP authors' layout "
              "(no projection / ln_post tensors); an OpenCLIP checkpoint loads as it is", file=sys.stderr)
        return 2
    try:
        model = open_clip.create_model(args.model)
        model.load_state_dict(adapt_state_dict(source, model, args.from_authors, args.model), strict=True)
    except (CheckpointLayoutError, ValueError) as err:
        print(f"openclip-align convert: error: {err}", file=sys.stderr)
        return 2
    del source
    if args.out:
        with atomic_open(args.out, "wb") as f:
            torch.save({"state_dict": model.state_dict()}, f)
        print(f"wrote {args.out} ({args.model}; load with pretrained={args.out!r})")
    else:
        _write_hf_dir(model, args.model, Path(args.hf_dir))
        print(f"wrote {args.hf_dir} (load with open_clip.create_model_and_transforms('local-dir:{args.hf_dir}'))")
    return 0
