"""Host memory of a SogCLR resume against the checkpoint's size (issue 29 item 5; goal: at most 1.3x).

SogCLR keeps 9 bytes per training pair (two float32 estimates and a visited flag), so at 400M pairs its
state is 3.6 GB and dominates the checkpoint. This script trains DualCLIP-Tiny with ``--loss sogclr`` for
one epoch on 16 pairs with the state sized for ``--num-samples`` pairs (default 50M: 450 MB; the trainer
would size it from the data, here the size is set in the child process), then resumes it for a second
epoch in a fresh process and measures, in that process:

* ``rss_before_load``: its resident memory (VmRSS) just before upstream's resume load (``pt_load``):
  Python, torch, the model, the optimizer, no loss state yet;
* ``peak_rss``: its peak resident memory over the whole run (``getrusage(RUSAGE_SELF).ru_maxrss``,
  which counts anonymous and file-backed pages alike, memory-mapped checkpoint pages included);
* ``resume_rise = peak_rss - rss_before_load``: what resuming and training the epoch added, to compare
  with the checkpoint's size.

``--mode before`` emulates the code before this change (upstream's full read held by ``main`` for the
whole run, plus a second full read of the same file for the loss state); ``--mode now`` is the code as
it is. Writes measurements/resume_memory.{json,md}.

    python measurements/resume_memory.py [--num-samples 50000000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(num_samples: int, mode: str, report: str, argv) -> None:
    """One trainer run in this process, the SogCLR state sized for ``num_samples`` pairs."""
    import torch

    from openclip_align.integration import checkpoints, data_wiring, trainer_adapter

    data_wiring.dataset_size = lambda *a, **k: num_samples
    if mode == "before":
        def full_load(upstream, path, map_location=None):
            # read whole, record left in place and not handed on: the restore reads the file again
            return upstream(path, map_location=map_location), checkpoints.NOT_LOADED

        def second_read(path):
            checkpoint = torch.load(path, map_location="cpu")            # the restore's own full read
            return checkpoint["optimizer"].get(checkpoints.PLUGIN_KEY)

        checkpoints.load_once = full_load
        trainer_adapter.read_resume_checkpoint = second_read
    import open_clip_train.file_utils as file_utils                     # the plugin wraps pt_load on import

    measured = {}
    wrapped = file_utils.pt_load

    def pt_load(path, map_location=None):
        measured["rss_before_load"] = _vm_rss()
        return wrapped(path, map_location=map_location)

    file_utils.pt_load = pt_load
    sys.argv = ["open_clip_train.main", *argv]
    try:
        runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
    finally:
        measured["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(report).write_text(json.dumps(measured))


def _csv(folder: Path, n: int = 16) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["filepath\ttitle"]
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path}\ta picture number {i}")
    csv = folder / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def _run(num_samples: int, mode: str, argv, work: Path) -> dict:
    report = work / f"report-{mode}-{len(list(work.glob('report-*')))}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("OPENCLIP_ALIGN_DISABLE", None)
    out = subprocess.run([sys.executable, __file__, "--child", str(num_samples), mode, str(report), *argv],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"trainer run failed ({mode}):\n{out.stderr[-4000:]}")
    return json.loads(report.read_text())


def measure(num_samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv = _csv(work)
        common = ["--model", "DualCLIP-Tiny", "--loss", "sogclr", "--train-data", str(csv), "--dataset-type", "csv",
                  "--batch-size", "16", "--workers", "0", "--precision", "fp32", "--device", "cpu",
                  "--warmup", "1", "--seed", "0", "--lr", "1e-4", "--logs", str(work / "logs")]
        _run(num_samples, "now", [*common, "--epochs", "1", "--name", "run"], work)
        checkpoint = work / "logs" / "run" / "checkpoints" / "epoch_1.pt"
        size = checkpoint.stat().st_size
        rows = {}
        for mode in ("now", "before"):
            name = f"resume-{mode}"
            (work / "logs" / name / "checkpoints").mkdir(parents=True)
            got = _run(num_samples, mode, [*common, "--epochs", "2", "--name", name, "--resume", str(checkpoint)],
                       work)
            rise = got["peak_rss"] - got["rss_before_load"]
            rows[mode] = {**got, "resume_rise": rise, "rise_over_checkpoint": round(rise / size, 3)}
        return {"num_samples": num_samples, "state_bytes": 9 * num_samples, "checkpoint_bytes": size,
                "model": "DualCLIP-Tiny", "goal_rise_over_checkpoint": 1.3, "runs": rows}


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 1 << 20
    lines = [
        "# Host memory of a SogCLR resume",
        "",
        f"DualCLIP-Tiny, `--loss sogclr` with its state sized for {result['num_samples']:,} pairs "
        f"({result['state_bytes'] / mib:.0f} MiB of state), checkpoint {result['checkpoint_bytes'] / mib:.0f} MiB, "
        "resumed for one epoch on CPU by `python measurements/resume_memory.py` (one process per run).",
        "",
        "`rise` = the resumed process's peak resident memory (`ru_maxrss`, anonymous and file-backed pages, "
        "memory-mapped checkpoint pages included) minus its resident memory just before upstream's resume load "
        "(Python, torch, model and optimizer already there, no loss state yet). The goal is a rise of at most "
        "1.3x the checkpoint.",
        "",
        "| code | before load (MiB) | peak (MiB) | rise (MiB) | rise / checkpoint |",
        "|---|---|---|---|---|",
    ]
    names = {"now": "now: one memory-mapped read, the state adopted", "before": "before: two full reads (emulated)"}
    for mode, row in result["runs"].items():
        lines.append(f"| {names[mode]} | {row['rss_before_load'] / mib:.0f} | {row['peak_rss'] / mib:.0f} | "
                     f"{row['resume_rise'] / mib:.0f} | {row['rise_over_checkpoint']:.2f}x |")
    lines += [
        "",
        "Now: upstream's resume load memory-maps the checkpoint (torch's zip format), the plugin takes its record "
        "from that load, and SogCLR adopts the mapped tensors (`load_state_dict(assign=True)`) in place of the "
        "zeros it was created with, which are freed; on a GPU the state is then moved to the device. Before: "
        "`main` held its full read for the whole run, the plugin read the file a second time and copied the "
        "state into the fresh one.",
        "",
    ]
    (out / "resume_memory.md").write_text("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=50_000_000)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    result = measure(args.num_samples)
    write_report(result, args.out)
    print((args.out / "resume_memory.md").read_text())


if __name__ == "__main__":
    main()
