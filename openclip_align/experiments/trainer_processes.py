"""Training runs for the benchmark, each a real ``python -m open_clip_train.main`` process.

The upstream baseline runs with the plugin switched off (``OPENCLIP_ALIGN_DISABLE=1``) and its
architecture given as an OpenCLIP ``local-dir:`` config, so it is OpenCLIP alone. Every run gets
the same data, steps, batch, schedule and seed. A tiny launcher around the trainer records the
process's peak memory, and throughput is read from the trainer's own log lines.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# Runs a module (the upstream trainer) as __main__ and writes the process's own peak memory; never imports the
# plugin itself. Peak RSS is /proc/self/status VmHWM, the high-water mark of this program's address space:
# getrusage's ru_maxrss would also count the parent's memory, which Linux carries over through fork and exec
# (every run of a large benchmark process would then report the parent's size).
_LAUNCHER = r"""
import json, os, resource, runpy, sys

def peak_rss_mb():
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # no /proc: kB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == 'darwin' else peak / 1024

module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
finally:
    stats = {'peak_rss_mb': peak_rss_mb()}
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        stats['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2**20
    with open(os.environ['OPENCLIP_ALIGN_BENCH_STATS'], 'w') as f:
        json.dump(stats, f)
"""
TRAINER = "open_clip_train.main"

_RATE = re.compile(r"Train Epoch: .*?, ([0-9.]+)/s, ")
_STEP = re.compile(r"Train Epoch: (?P<epoch>\d+) \[\s*\d+/\d+ \((?P<percent>\d+)%\)\].*?, (?P<rate>[0-9.]+)/s, ")
_LOSS = re.compile(r" Loss: ([-0-9.eE+naif]+) ")
_GLOG_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d")
PROGRESS_SECONDS = 60.0       # one progress line a minute per running trainer


@dataclass
class Budget:
    """What every configuration gets, identically."""
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 20
    wd: float = 0.1
    workers: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    log_every: int = 5


@dataclass
class TrainSpec:
    label: str                      # row name in the report
    model: str                      # OpenCLIP model name (or local-dir:)
    loss: str = "clip"
    upstream: bool = False          # run with the plugin switched off
    extra: List[str] = field(default_factory=list)
    budget_override: Dict[str, object] = field(default_factory=dict)


@dataclass
class TrainResult:
    label: str
    seed: int
    checkpoint: Path
    samples_per_second: float
    peak_rss_mb: float
    peak_cuda_mb: Optional[float]
    wall_seconds: float
    log_dir: Path


def write_local_dir_config(model_cfg: dict, directory: Path, image_size: int) -> str:
    """An OpenCLIP ``local-dir:`` model (config only) so the upstream run needs no plugin at all."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": image_size}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return f"local-dir:{directory}"


def train(spec: TrainSpec, train_data: str, budget: Budget, seed: int, logs: Path,
          dataset_type: str = "csv", progress: bool = False, name: Optional[str] = None, keep_checkpoint: bool = True,
          progress_every: float = PROGRESS_SECONDS, skip_steps: int = 1, threads: Optional[int] = None) -> TrainResult:
    """One trainer process. Its console goes to ``LOGS/NAME.console.log`` and the trainer's own log to
    ``LOGS/NAME/out.log``; both paths are logged when it starts, and a one-line progress summary every
    ``progress_every`` seconds with ``progress`` (the trainer alone may run for many minutes). ``threads`` sets
    the trainer's OMP_NUM_THREADS (None: torch's default, all cores)."""
    b = Budget(**{**budget.__dict__, **spec.budget_override})
    name = (name or f"{spec.label}-seed{seed}").replace(" ", "_").replace("/", "_")
    log_dir = logs / name
    if log_dir.exists():
        shutil.rmtree(log_dir)        # a re-run replaces this run's own logs only
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["--model", spec.model, "--train-data", train_data, "--dataset-type", dataset_type,
            "--batch-size", str(b.batch_size), "--epochs", str(b.epochs), "--lr", str(b.lr),
            "--warmup", str(b.warmup), "--wd", str(b.wd), "--seed", str(seed), "--workers", str(b.workers),
            "--precision", b.precision, "--device", b.device, "--logs", str(logs), "--name", name,
            "--log-every-n-steps", str(b.log_every)]
    if not spec.upstream:
        argv += ["--loss", spec.loss]
    argv += spec.extra
    stats_path = logs / f"{name}.stats.json"
    stats_path.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPENCLIP_ALIGN_BENCH_STATS=str(stats_path))
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    if threads is not None:           # runs side by side each take one core's worth of intra-op threads
        env["OMP_NUM_THREADS"] = str(threads)
    if spec.upstream:
        env["OPENCLIP_ALIGN_DISABLE"] = "1"
    console = logs / f"{name}.console.log"
    if progress:
        logging.info("  %s: live log %s", name, log_dir / "out.log")
    start = time.time()
    with open(console, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, TRAINER, *argv], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            while True:
                try:
                    proc.wait(timeout=progress_every)
                    break
                except subprocess.TimeoutExpired:
                    if progress:
                        logging.info("  %s: %s", name, progress_line(log_dir / "out.log", b.epochs, time.time() - start))
        except BaseException:         # Ctrl-C or an error here: never leave the trainer running behind
            proc.kill()
            proc.wait()
            raise
    wall = time.time() - start
    if proc.returncode != 0:
        tail = failure_tail(console.read_text(errors="replace"))
        raise RuntimeError(f"training run {name} failed (exit {proc.returncode}; console log {console}); "
                           f"log tail:\n{tail}")
    stats = json.loads(stats_path.read_text())
    checkpoint = log_dir / "checkpoints" / f"epoch_{b.epochs}.pt"
    if not keep_checkpoint:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return TrainResult(spec.label, seed, checkpoint, throughput(log_dir / "out.log", skip=skip_steps),
                       stats["peak_rss_mb"], stats.get("peak_cuda_mb"), wall, log_dir)


def failure_tail(console: str, limit: int = 3000) -> str:
    """The end of a failed run's console, without torch's INFO-level glog lines (``I1124 20:26:39...``: the
    compile metrics it prints at exit), which would push the trainer's own error out of the tail."""
    return "\n".join(line for line in console.splitlines() if not _GLOG_INFO.match(line))[-limit:]


def progress_line(out_log: Path, epochs: int, elapsed: float) -> str:
    """The trainer's last step line condensed: epoch, share of it done, samples/s, loss."""
    text = out_log.read_text(errors="replace") if out_log.exists() else ""
    steps = list(_STEP.finditer(text))
    if not steps:
        return f"starting ({elapsed / 60:.1f} min)"
    last = steps[-1]
    loss = _LOSS.findall(text[last.start():last.start() + 2000].splitlines()[0])
    return (f"epoch {int(last.group('epoch')) + 1}/{epochs}, {last.group('percent')}% of it, "
            f"{float(last.group('rate')):.0f} samples/s" + (f", loss {float(loss[-1]):.4g}" if loss else "")
            + f" ({elapsed / 60:.1f} min)")


def throughput(out_log: Path, skip: int = 1) -> float:
    """Median training samples/s over the logged steps, skipping the first ``skip`` (warm-up) log lines."""
    rates = [float(m.group(1)) for m in _RATE.finditer(out_log.read_text())]
    if not rates:
        raise RuntimeError(f"no training throughput lines in {out_log}")
    return statistics.median(rates[skip:] if len(rates) > skip + 1 else rates)
