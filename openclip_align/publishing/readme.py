"""README's benchmark tables, regenerated from a run's results.json (never edited by hand).

The README keeps one block per benchmark track between ``<!-- benchmark:TRACK:start -->`` and
``<!-- benchmark:TRACK:end -->``, the table at initialisation between
``<!-- benchmark:initialisation:start -->`` and ``<!-- benchmark:initialisation:end -->`` (left as it is for
results without a measured table), and the study's grid between ``<!-- study:start -->`` and
``<!-- study:end -->``; everything outside the markers is left as it is.

    python -m openclip_align.publishing.readme README.md benchmark/results.json [study/results.json]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

from openclip_align.experiments.benchmark_report import track_tables
from openclip_align.experiments.initialisation import initialisation_lines


def machine_text(machine: Optional[dict]) -> str:
    """What the results recorded about the machine: device, cores, load; nothing that was not recorded."""
    machine = machine or {}
    parts = [machine["device"]] if machine.get("device") else []
    if machine.get("cpus"):
        parts.append(f"{machine['cpus']} CPU cores")
    start, end = machine.get("load_at_start"), machine.get("load_at_end")
    if start and end:
        parts.append(f"1-minute load average {start[0]:.1f} at the start, {end[0]:.1f} at the end")
    return ", ".join(parts)


def _where(results: dict) -> str:
    machine = machine_text(results.get("machine"))
    return f"From `{results['command']}`, {results['created']}" + (f" ({machine})." if machine else ".")


def block(results: dict, track: str) -> str:
    return "\n".join([_where(results) + _duration(results, track), "", *track_tables(results["tracks"][track])])


def initialisation_block(results: dict) -> str:
    return "\n".join([_where(results), "", *initialisation_lines(results["initialisation"])])


def kept_run(results_json: Path, results: dict) -> Optional[Path]:
    """The newest run of the same variant kept in a folder beside the published one (``benchmark/*/``) and made
    after it, whose rows the published run may lack; None when there is none."""
    found = []
    for path in sorted(Path(results_json).parent.glob("*/results.json")):
        other = json.loads(path.read_text())
        if other.get("variant") == results.get("variant") and other.get("created", "") > results.get("created", ""):
            found.append((other["created"], path))
    return max(found)[1] if found else None


def _link(path: Path, readme: Optional[Path]) -> str:
    import os

    return os.path.relpath(path, Path(readme).parent if readme else Path.cwd())


def speed_block(results: dict, results_json: Path, readme: Optional[Path] = None) -> str:
    """The GPU run kept beside the published one (newest ``benchmark/*/results.json`` made on CUDA) and the
    CPU tables' speed ratios, as one paragraph (:func:`.reading.speed_line`)."""
    from .reading import speed_line

    gpu = []
    for path in sorted(Path(results_json).parent.glob("*/results.json")):
        other = json.loads(path.read_text())
        if (other.get("machine") or {}).get("device") == "cuda":
            gpu.append((other.get("created", ""), path, other))
    newest = max(gpu, key=lambda g: (g[0], str(g[1]))) if gpu else None
    return speed_line(results, newest[2] if newest else None,
                      _link(newest[1].with_name("results.md"), readme) if newest else "")


def reading_block(results: dict, results_json: Optional[Path] = None, readme: Optional[Path] = None) -> str:
    """The paragraphs under "How to read it" (:mod:`.reading`), with the run's time."""
    from .reading import reading_lines

    kept_path = kept_run(results_json, results) if results_json is not None else None
    kept = json.loads(kept_path.read_text()) if kept_path else None
    link = _link(kept_path.with_name("results.md"), readme) if kept_path is not None else ""
    times = [f"{track.replace('_', ' ')} {sum(entry.get(k, 0.0) for k in ('train_seconds', 'speed_seconds', 'eval_seconds')) / 60:.0f}"
             for track, entry in results["tracks"].items() if "train_seconds" in entry]
    lines = []
    if "total_seconds" in results:
        machine = machine_text(results.get("machine"))
        lines += [f"The published run took {results['total_seconds'] / 60:.0f} minutes"
                  + (f" ({machine})" if machine else "") + (f": {' and '.join(times)} min by track, speed windows "
                                                            "included" if times else "") + ".", ""]
    return "\n".join(lines + reading_lines(results, kept, link))


def _duration(results: dict, track: str) -> str:
    """How long this track and the whole run took, as the run measured them (absent in old results)."""
    entry = results["tracks"][track]
    if "train_seconds" not in entry or "total_seconds" not in results:
        return ""
    spent = entry["train_seconds"] + entry.get("speed_seconds", 0.0) + entry.get("eval_seconds", 0.0)
    return (f" This track: {spent / 60:.1f} min (training {entry['train_seconds'] / 60:.1f}); "
            f"the whole run: {results['total_seconds'] / 60:.1f} min.")


def study_block(results: dict) -> str:
    from openclip_align.experiments.grid_study import table_lines, title

    machine = machine_text(results.get("machine"))
    return "\n".join([f"From `{results['command']}`, {results['created']} ({title(results)}; "
                      f"{results['seconds'] / 60:.0f} min" + (f", {machine}" if machine else "") + ").", "",
                      *table_lines(results), "", *ranking_lines(results)])


def ranking_lines(results: dict) -> list:
    """Each optimizer's losses ordered by the grid's average (what the prose below the grid compares)."""
    rows = [(loss, opt, entry["average"]["mean"]) for loss, by_opt in results.get("table", {}).items()
            for opt, entry in by_opt.items() if entry.get("status") == "ok"]
    lines = []
    for optimizer in dict.fromkeys(opt for _, opt, _ in rows):
        ranked = sorted((r for r in rows if r[1] == optimizer), key=lambda r: -r[2])
        lines.append(f"* By average with {optimizer}: " + " > ".join(f"{loss} {100 * avg:.1f}" for loss, _, avg in ranked)
                     + ".")
    return lines


def _replace(text: str, marker: str, content: str) -> tuple:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)   # may be empty
    if not pattern.search(text):
        return text, False
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text), True


def update_readme(readme: Path, results_json: Optional[Path], study_json: Optional[Path] = None) -> list:
    """Rewrite every block the README has markers for (benchmark tracks only with ``results_json``, the study
    grid only with ``study_json``); returns the blocks rewritten."""
    results = json.loads(Path(results_json).read_text()) if results_json is not None else {"tracks": {}}
    text = Path(readme).read_text()
    done = []
    for track in results["tracks"]:
        text, found = _replace(text, f"benchmark:{track}", block(results, track))
        done += [track] if found else []
    if results_json is not None:
        text, found = _replace(text, "benchmark:reading", reading_block(results, Path(results_json), Path(readme)))
        done += ["reading"] if found else []
        text, found = _replace(text, "benchmark:speed-summary", speed_block(results, Path(results_json), Path(readme)))
        done += ["speed-summary"] if found else []
    if (results.get("initialisation") or {}).get("models"):       # older runs, or a failed measurement: skip
        text, found = _replace(text, "benchmark:initialisation", initialisation_block(results))
        done += ["initialisation"] if found else []
    if study_json is not None:
        text, found = _replace(text, "study", study_block(json.loads(Path(study_json).read_text())))
        done += ["study"] if found else []
    Path(readme).write_text(text)
    return done


def temperature_block(results: dict) -> str:
    from openclip_align.experiments.temperature_study import reference_line, table_lines, title

    return "\n".join([f"From `{results['command']}`, {results['created']} ({title(results)}; "
                      f"{results['seconds'] / 60:.0f} min).", "", *table_lines(results), "", reference_line(results),
                      "", "![temperature study](study/temperature/temperature.png)"])


def update_temperature_block(readme: Path, results_json: Path) -> bool:
    """Rewrite the temperature study's block, between ``<!-- study:temperature:start -->`` and
    ``<!-- study:temperature:end -->``, from its published results.json; False when README has no markers."""
    return replace_block(readme, "study:temperature", temperature_block(json.loads(Path(results_json).read_text())))


def replace_block(readme: Path, marker: str, content: str) -> bool:
    """Rewrite one marked block of ``readme`` in place; False (file untouched) when it has no such markers."""
    text, found = _replace(Path(readme).read_text(), marker, content)
    if found:
        Path(readme).write_text(text)
    return found


if __name__ == "__main__":
    rewritten = update_readme(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    print(f"{sys.argv[1]}: rewrote {', '.join(rewritten) or 'nothing (no markers)'}")
