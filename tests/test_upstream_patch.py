"""patches/: the upstream change that would replace the plugin's run-time patching still applies (issue 2)."""
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from _upstream_tree import upstream_tree

PATCH = Path(__file__).resolve().parent.parent / "patches" / "open_clip-plugin-registry.patch"


def test_patch_applies_cleanly_to_installed_open_clip(tmp_path):
    tree = upstream_tree(tmp_path)
    check = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=tree, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_patched_open_clip_offers_the_registries(tmp_path):
    tree = upstream_tree(tmp_path)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tree, check=True)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OPENCLIP_ALIGN_DISABLE="1")
    code = (
        "import open_clip, open_clip_train.params as p, open_clip_train.main\n"
        "assert open_clip.__file__.startswith(%r)\n"
        "open_clip.register_loss('demo', lambda args: 'built')\n"
        "args = p.parse_args(['--loss', 'demo'])\n"
        "print(open_clip.list_losses(), open_clip.create_loss(args))\n" % str(tree)
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['clip', 'demo'] built" in out.stdout


DDP_PATCH = PATCH.parent / "open_clip-ddp-cpu.patch"


RESUME_PATCH = PATCH.parent / "open_clip-resume-any-world-size.patch"


@pytest.mark.parametrize("patch", [DDP_PATCH, RESUME_PATCH], ids=lambda p: p.name)
def test_distributed_patches_apply_alone_and_after_the_others(tmp_path, patch):
    alone = upstream_tree(tmp_path / "alone")
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=alone, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    together = upstream_tree(tmp_path / "together")
    for other in (PATCH, DDP_PATCH, RESUME_PATCH):
        if other != patch:
            subprocess.run(["git", "apply", str(other)], cwd=together, check=True)
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=together, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ddp_cpu_patch_lets_plain_open_clip_wrap_a_cpu_model(tmp_path):
    """The patched main's DDP call, run by itself without the plugin: a CPU module in a 1-rank gloo group."""
    tree = upstream_tree(tmp_path)
    subprocess.run(["git", "apply", str(DDP_PATCH)], cwd=tree, check=True)
    main = (tree / "src" / "open_clip_train" / "main.py").read_text()
    start = main.index("        ddp_args = {")
    end = main.index("\n", main.index("model = torch.nn.parallel.DistributedDataParallel(model"))
    block = "\n".join(line[8:] for line in main[start:end].splitlines())     # the patched lines, dedented
    code = (
        "import os, socket, torch, torch.distributed as dist\n"
        "from types import SimpleNamespace\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
        "args = SimpleNamespace(ddp_static_graph=False)\n"
        "device = torch.device('cpu')\n"
        "model = torch.nn.Linear(3, 2)\n"
        + block + "\n"
        "model(torch.ones(4, 3)).sum().backward()\n"
        "print(type(model).__name__, model.device_ids)\n"
    )
    env = dict(os.environ, OPENCLIP_ALIGN_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "DistributedDataParallel None" in out.stdout
