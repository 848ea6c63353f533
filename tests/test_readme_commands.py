"""Every training, refine and gap command README.md shows does what it says (issue 18, item 1).

Each command is run as written, scaled down only by flags appended after it (argparse keeps the last
value): a small corpus of real digit scans, batch 16, one epoch, and a warmup that keeps the command's
own warmup fraction of its schedule on the embedded default. The checks: the command's warmup ends
within its schedule on the default corpus, the logged learning rate reaches the command's ``--lr``,
the weights moved (and locked towers did not), and the gap command writes its report.

The commands of "Use the authors' checkpoints" (they name AUTHORS_FILE) run the same way, with a file in the
AlignCLIP authors' layout at Tiny dimensions and ``--model AlignCLIP-Tiny`` (the config of that shape)
appended; their clip_benchmark and convert commands run too. That section's Python lines are
``create_model_and_transforms(NAME, pretrained=FILE)``, which tests/test_authors_checkpoints.py runs.
"""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _trainer_launch import train
from conftest import write_digits_corpus

README = Path(__file__).resolve().parents[1] / "README.md"
AUTHORS_FILE = "alignclip_vitb16.pt"          # README's name for a checkpoint downloaded from the authors
SCALED_BATCH, SCALED_PAIRS = 16, 64


def readme_commands():
    """Shell commands of README's bash blocks (line continuations joined), as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def trainer_commands():
    return [c[3:] for c in readme_commands() if c[:3] == ["python", "-m", "open_clip_train.main"]]


def gap_commands():
    return [c[2:] for c in readme_commands() if c[:2] == ["openclip-align", "gap"]]


def authors_commands(*head):
    """README commands that start with ``head`` and use the authors' checkpoint (``head`` dropped)."""
    return [c[len(head):] for c in readme_commands() if list(head) == c[:len(head)] and AUTHORS_FILE in c]


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    """A checkpoint in the AlignCLIP authors' layout (their names, shapes, training-script dict), Tiny dims."""
    from _authors_files import TINY, save_as_their_script, their_state_dict

    return save_as_their_script(their_state_dict(**TINY), tmp_path_factory.mktemp("authors") / AUTHORS_FILE)


AUTHORS_SCALED = ["--model", "AlignCLIP-Tiny"]     # the plugin config of the Tiny file's shape


def flag(argv, name, default=None):
    """The value argparse would use: the last occurrence wins."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else default


def default_corpus_pairs() -> int:
    """The embedded default's training pairs, as the published benchmark run recorded them (README no longer types
    the count by hand: its numbers come from the results files)."""
    results = json.loads((README.parent / "benchmark" / "results.json").read_text())
    pairs = results["data"]["train_pairs"]
    assert isinstance(pairs, int) and pairs > 0, "the published run records the embedded default's training pairs"
    return pairs


def full_schedule_steps(argv) -> int:
    batch = int(flag(argv, "--batch-size", 64))
    return math.ceil(default_corpus_pairs() / batch) * int(flag(argv, "--epochs", 32))


def command_id(argv):
    return f"{flag(argv, '--model')}-{flag(argv, '--loss', 'clip')}"


def test_readme_shows_the_commands_this_file_checks():
    assert len(trainer_commands()) >= 3 and len(gap_commands()) >= 1
    for head in (["openclip-align", "gap"], ["clip_benchmark", "eval"], ["python", "-m", "open_clip_train.main"],
                 ["openclip-align", "convert"]):
        assert authors_commands(*head), f"README's authors' section shows {' '.join(head)}"


@pytest.mark.parametrize("argv", trainer_commands(), ids=command_id)
def test_warmup_ends_within_the_schedule_on_the_default_corpus(argv):
    assert flag(argv, "--lr") is not None, "state the learning rate the command trains with"
    assert flag(argv, "--warmup") is not None, "upstream's default warmup (10000 steps) outlasts any README run"
    assert int(flag(argv, "--warmup")) < full_schedule_steps(argv)
    assert flag(argv, "--workers") is not None, "upstream's default of 4 workers oversubscribes small machines"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_digits_corpus(tmp_path_factory.mktemp("readme"), n_train=SCALED_PAIRS, n_heldout=32)


def towers_command():
    """README's command that trains DualCLIP-Lite0-MiniLM from the packaged towers (no --pretrained)."""
    found = [c for c in trainer_commands()
             if flag(c, "--model") == "DualCLIP-Lite0-MiniLM" and flag(c, "--pretrained") is None]
    assert found, "README trains a CLIP from the packaged towers"
    return found[0]


@pytest.fixture(scope="module")
def readme_runs(corpus, authors_file, tmp_path_factory):
    """Each README trainer command run once, scaled down; cached, because the checkpoint of the packaged-towers
    command is the PATH the commands that start from PATH are given (one run less)."""
    cache = {}

    def run(argv):
        key = tuple(argv)
        if key not in cache:
            scaled_steps = math.ceil(SCALED_PAIRS / SCALED_BATCH)
            warmup = math.ceil(int(flag(argv, "--warmup")) * scaled_steps / full_schedule_steps(argv))
            extra = []
            if AUTHORS_FILE in argv:            # the authors' checkpoint, Tiny, on this CPU
                extra = [*AUTHORS_SCALED, "--pretrained", str(authors_file), "--precision", "fp32", "--device", "cpu"]
            elif flag(argv, "--pretrained"):
                start, _ = run(towers_command())
                extra = ["--pretrained", str(start / "checkpoints" / "epoch_1.pt")]
            if flag(argv, "--loss") == "imsep" and flag(argv, "--semantic-model") is None:
                # the digits corpus has no train.emb.npy, so captions are embedded on the fly; the default
                # encoder (mpnet) is installed by `make data`, not `make install`, so a fresh venv scales
                # down to MiniLM
                extra = [*extra, "--semantic-model", "all-MiniLM-L6-v2"]
            logs = tmp_path_factory.mktemp("readme-run")
            cache[key] = run_trainer(argv, corpus, logs, "readme", epochs=1, warmup=warmup, extra=extra), [*argv, *extra]
        return cache[key]

    return run


def run_trainer(argv, corpus, logs, name, epochs, warmup, extra=()):
    appended = ["--train-data", str(corpus / "train.csv"), "--val-data", str(corpus / "heldout.csv"),
                "--batch-size", str(SCALED_BATCH), "--epochs", str(epochs), "--warmup", str(warmup),
                "--workers", "0", "--seed", "0", "--log-every-n-steps", "1", "--save-frequency", "1",
                "--logs", str(logs), "--name", name, *extra]
    train([*argv, *appended], timeout=900)          # asserts it exits 0
    return logs / name


def logged_lrs(run: Path):
    return [float(v) for v in re.findall(r" LR: ([0-9.]+) ", (run / "out.log").read_text())]


def initial_state(argv):
    import open_clip

    torch.manual_seed(0)                       # what open_clip_train.main does before building the model
    model = open_clip.create_model(flag(argv, "--model"), pretrained=None)
    pretrained = flag(argv, "--pretrained")
    if pretrained is not None:
        model = open_clip.create_model(flag(argv, "--model"), pretrained=pretrained)
    return model.state_dict()


@pytest.mark.parametrize("argv", trainer_commands(), ids=command_id)
def test_trainer_command_trains_as_written(argv, readme_runs):
    scaled_steps = math.ceil(SCALED_PAIRS / SCALED_BATCH)
    run, argv = readme_runs(argv)

    lrs = logged_lrs(run)
    assert len(lrs) == scaled_steps
    assert max(lrs) == pytest.approx(float(flag(argv, "--lr")), abs=5e-7)    # logged with 6 decimals

    before = initial_state(argv)
    after = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    after = {k.removeprefix("module."): v for k, v in after.items()}
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert moved, "no weight changed"
    if "--lock-image" in argv:                  # the stem sits in the locked groups of every command here
        stem = [k for k in before if k.startswith("visual.trunk.conv_stem")]
        assert stem and not set(stem) & set(moved)
    if "--lock-text" in argv:
        embeddings = [k for k in before if k.startswith("text.transformer.embeddings")]
        assert embeddings and not set(embeddings) & set(moved)


@pytest.mark.parametrize("argv", gap_commands(), ids=lambda a: flag(a, "--model"))
def test_gap_command_writes_its_report(argv, corpus, tmp_path, request):
    import open_clip

    ckpt = tmp_path / "model.pt"
    if AUTHORS_FILE in argv:
        argv, ckpt = [*argv, *AUTHORS_SCALED], request.getfixturevalue("authors_file")
    else:
        torch.manual_seed(0)
        torch.save({"state_dict": open_clip.create_model(flag(argv, "--model")).state_dict()}, ckpt)
    out_dir = tmp_path / "report"
    appended = ["--pretrained", str(ckpt), "--data", str(corpus / "heldout.csv"),
                "--classes", str(corpus / "zeroshot" / "digits.csv"),
                "--classnames", str(corpus / "zeroshot" / "digits.json"), "--out", str(out_dir), "--no-progress"]
    out = subprocess.run([sys.executable, "-m", "openclip_align.cli", "gap", *argv, *appended],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    reports = list(out_dir.glob("*.json"))
    assert reports and list(out_dir.glob("*.png"))
    metrics = json.loads(reports[0].read_text())
    flat = json.dumps(metrics)
    assert "centroid_gap" in flat


def run_tool(argv, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.mark.parametrize("argv", authors_commands("clip_benchmark", "eval"), ids=lambda a: flag(a, "--task"))
def test_authors_clip_benchmark_command_runs(argv, corpus, authors_file, tmp_path):
    from openclip_align.data.clip_benchmark_sets import write_clip_benchmark_sets

    write_clip_benchmark_sets(corpus)                          # the layouts a corpus build writes
    cli = Path(sys.executable).with_name("clip_benchmark")
    done = run_tool([str(cli) if cli.exists() else "clip_benchmark", "eval", *argv, *AUTHORS_SCALED,
                     "--pretrained", str(authors_file), "--dataset", "wds/digits",
                     "--dataset_root", f"{corpus}/clip_benchmark/{{dataset}}", "--output", "{dataset}.json"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "digits.json").read_text())["metrics"]
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1


@pytest.mark.parametrize("argv", authors_commands("openclip-align", "convert"), ids=lambda a: flag(a, "--model"))
def test_authors_convert_command_writes_a_checkpoint_that_loads(argv, authors_file, tmp_path):
    import open_clip

    done = run_tool([sys.executable, "-m", "openclip_align.cli", "convert", *argv, *AUTHORS_SCALED,
                     "--from-authors", str(authors_file)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(authors_file, map_location="cpu", weights_only=True)["state_dict"]
    model = open_clip.create_model("AlignCLIP-Tiny", pretrained=str(tmp_path / flag(argv, "--out")))
    assert torch.equal(model.proj.weight, theirs["projection"].T)


def docs_trainer_commands():
    """Trainer commands (python -m / torchrun / srun) in docs/*.md code blocks that state an --epochs."""
    commands = []
    for doc in sorted((README.parent / "docs").glob("*.md")):
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                if "open_clip_train.main" in command and "--epochs" in command:
                    commands.append(pytest.param(shlex.split(command), id=f"{doc.name}:{command.split()[0]}"))
    return commands


@pytest.mark.parametrize("argv", docs_trainer_commands())
def test_docs_trainer_commands_state_lr_and_a_warmup_inside_the_run(argv):
    """Upstream's defaults (warmup 10000 steps) would leave a documented run at a tiny lr throughout."""
    assert flag(argv, "--lr") is not None and flag(argv, "--warmup") is not None
    if str(flag(argv, "--train-data", "")).startswith("data/default/"):     # steps known: the embedded default
        ranks = int(flag(argv, "--nproc_per_node", 1))
        steps = math.ceil(default_corpus_pairs() / (int(flag(argv, "--batch-size")) * ranks))
        assert int(flag(argv, "--warmup")) < steps * int(flag(argv, "--epochs"))
