"""The installed OpenCLIP copied out and laid out like its repository, for testing patches/ against it."""
import shutil
from pathlib import Path

import open_clip
import open_clip_train


def upstream_tree(root: Path) -> Path:
    """``root/src/open_clip`` and ``root/src/open_clip_train`` from the installed packages; returns ``root``."""
    src = root / "src"
    for package in (open_clip, open_clip_train):
        shutil.copytree(Path(package.__file__).parent, src / package.__name__,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root
