"""The one way the tests launch ``open_clip_train.main``: in this process, as ``python -m`` (one rank), or
under torchrun (N gloo ranks on this machine); with the flags of a short CPU run and the readers of what
a run wrote.

Every launch is offline (HF_HUB_OFFLINE=1) and runs with the plugin active (OPENCLIP_ALIGN_DISABLE dropped
from the environment) unless ``disable``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from _dist import free_port

MAIN = "open_clip_train.main"
ERROR = "open_clip_train.main: error:"        # how the plugin's one-line user errors start on stderr
NICE = ["nice", "-n", "19"]                    # multi-process runs yield the 2 cores to the rest of the suite
HARNESS = Path(__file__).resolve().parent / "_trainer_harness.py"


def base(batch_size=16, lr=5e-4, dataset_type="csv"):
    """The flags of a short CPU run: fp32, no loader workers, one warmup step, seed 0, a log line per step."""
    return ["--lr", str(lr), "--dataset-type", dataset_type, "--batch-size", str(batch_size), "--workers", "0",
            "--precision", "fp32", "--device", "cpu", "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1"]


BASE = base()


def trainer_env(disable: bool = False, **extra) -> dict:
    """This environment, offline, with the plugin active (or off with ``disable``), plus ``extra``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    if disable:
        env["OPENCLIP_ALIGN_DISABLE"] = "1"
    return env


def main_command(script=None) -> list:
    """``python -m open_clip_train.main``, or ``python SCRIPT`` for a script that runs it (the harness)."""
    return [sys.executable, str(script)] if script is not None else [sys.executable, "-m", MAIN]


def torchrun_command(script=None, nproc: int = 2, nnodes: int = 1, node_rank: int = 0, port=None) -> list:
    """``torchrun`` of ``-m open_clip_train.main`` (or of SCRIPT) with ``nproc`` ranks on this node, as one of
    ``nnodes`` nodes on localhost (all nodes of one run pass the same ``port``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
    if nnodes > 1:
        cmd += ["--node_rank", str(node_rank)]
    cmd += ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    return [*cmd, str(script)] if script is not None else [*cmd, "-m", MAIN]


def _named(argv, logs, name) -> list:
    """ARGV, then ``--logs LOGS`` and ``--name NAME`` where given."""
    return [*argv, *([] if logs is None else ["--logs", str(logs)]), *([] if name is None else ["--name", name])]


def train(argv, logs=None, name=None, *, check=True, disable=False, env=None, cwd=None, timeout=600,
          nofile=None, command=None, nice=False) -> subprocess.CompletedProcess:
    """Run ``ARGV [--logs LOGS] [--name NAME]`` through ``command`` (default ``python -m open_clip_train.main``;
    else ``main_command(SCRIPT)`` or ``torchrun_command(...)``) in a fresh process and return it finished.

    check: assert it exited 0, its output's tails as the message. env: variables added to ``trainer_env``.
    nofile: the process's limit on open descriptors. nice: at the lowest priority."""
    argv = _named(argv, logs, name)
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    cmd = [*(NICE if nice else []), *(command or main_command()), *argv]
    out = subprocess.run(cmd, env=trainer_env(disable, **(env or {})), cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, preexec_fn=limit)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def train_here(argv, logs=None, name=None):
    """upstream's ``main(ARGV [--logs LOGS] [--name NAME])`` in this process, so that the test's monkeypatches
    and hooks apply; the log handlers the run adds are closed and removed after. Returns what main returns."""
    from open_clip_train.main import main

    argv = _named(argv, logs, name)
    handlers = list(logging.root.handlers)
    try:
        return main(argv)
    finally:
        for handler in logging.root.handlers[len(handlers):]:
            handler.close()
        logging.root.handlers[:] = handlers


def run_ranks(argv, logs: Path, name: str, nproc: int = 2):
    """``torchrun --nproc_per_node nproc`` of the harness (nproc=2) or the 1-rank reference reading the
    global batches of 2 ranks of --batch-size/2 (nproc=1); each loss call recorded by the harness (``calls``).
    Returns the run directory."""
    record = logs / name / "record"
    record.mkdir(parents=True)
    env = {"OMP_NUM_THREADS": "1", "HARNESS_RECORD": str(record)}
    if nproc == 1:
        batch = int(argv[argv.index("--batch-size") + 1])
        accum = int(argv[argv.index("--accum-freq") + 1]) if "--accum-freq" in argv else 1
        command = main_command(HARNESS)
        # a rank's rows of one optimizer step: its --accum-freq batches, which the loss sees concatenated
        env.update(HARNESS_EMULATE_WORLD="2", HARNESS_EMULATE_BATCH=str(batch // 2 * accum))
    else:
        command = torchrun_command(HARNESS, nproc)
    out = train([*argv, "--log-root", str(logs), "--name", name], command=command, nice=True, env=env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return logs / name


def calls(run: Path, rank: int = 0):
    """Each loss call's terms, as the harness recorded them on ``rank``."""
    return [json.loads(line) for line in (run / "record" / f"rank{rank}.jsonl").read_text().splitlines()]


def error_lines(out) -> list:
    """The lines of a run's stderr that are the plugin's one-line user errors."""
    return [line for line in out.stderr.splitlines() if line.startswith(ERROR)]


def logged(out_log: Path, term: str):
    """Per-step values of one loss term from out.log ("Imsep_loss: 1.2345 (avg)")."""
    pattern = re.compile(rf"{term}: ([0-9.eE+-]+) \(")
    return [float(m.group(1)) for m in pattern.finditer(out_log.read_text())]
