"""README's benchmark tables, regenerated from a run's results.json (never edited by hand).

The README keeps one block per benchmark track between ``<!-- benchmark:TRACK:start -->`` and
``<!-- benchmark:TRACK:end -->``, the table at initialisation between
``<!-- benchmark:initialisation:start -->`` and ``<!-- benchmark:initialisation:end -->`` (left as it is for
results without a measured table), and the study's grid between ``<!-- study:start -->`` and
``<!-- study:end -->``; everything outside the markers is left as it is.

    python -m openclip_align.benchmark.readme README.md benchmark/results.json [study/results.json]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

from .initialisation import initialisation_lines
from .report import track_tables


def block(results: dict, track: str) -> str:
    where = f"From `{results['command']}`, {results['created']} ({results['machine']['device']})."
    return "\n".join([where + _duration(results, track), "", *track_tables(results["tracks"][track])])


def initialisation_block(results: dict) -> str:
    where = f"From `{results['command']}`, {results['created']} ({results['machine']['device']})."
    return "\n".join([where, "", *initialisation_lines(results["initialisation"])])


def _duration(results: dict, track: str) -> str:
    """How long this track and the whole run took, as the run measured them (absent in old results)."""
    entry = results["tracks"][track]
    if "train_seconds" not in entry or "total_seconds" not in results:
        return ""
    spent = entry["train_seconds"] + entry.get("speed_seconds", 0.0) + entry.get("eval_seconds", 0.0)
    return (f" This track: {spent / 60:.1f} min (training {entry['train_seconds'] / 60:.1f}); "
            f"the whole run: {results['total_seconds'] / 60:.1f} min.")


def study_block(results: dict) -> str:
    from .study import table_lines, title

    return "\n".join([f"From `{results['command']}`, {results['created']} ({title(results)}; "
                      f"{results['seconds'] / 60:.0f} min on 2 CPU cores).", "", *table_lines(results)])


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
    if (results.get("initialisation") or {}).get("models"):       # older runs, or a failed measurement: skip
        text, found = _replace(text, "benchmark:initialisation", initialisation_block(results))
        done += ["initialisation"] if found else []
    if study_json is not None:
        text, found = _replace(text, "study", study_block(json.loads(Path(study_json).read_text())))
        done += ["study"] if found else []
    Path(readme).write_text(text)
    return done


def temperature_block(results: dict) -> str:
    from .temperature import reference_line, table_lines, title

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
