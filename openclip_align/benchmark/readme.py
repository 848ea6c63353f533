"""README's benchmark tables, regenerated from a run's results.json (never edited by hand).

The README keeps one block per track between ``<!-- benchmark:TRACK:start -->`` and
``<!-- benchmark:TRACK:end -->``; everything outside the markers is left as it is.

    python -m openclip_align.benchmark.readme README.md benchmark/results.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .report import track_tables


def block(results: dict, track: str) -> str:
    where = f"From `{results['command']}`, {results['created']} ({results['machine']['device']})."
    return "\n".join([where, "", *track_tables(results["tracks"][track])])


def update_readme(readme: Path, results_json: Path) -> list:
    """Rewrite every track block the README has markers for; returns the tracks rewritten."""
    results = json.loads(Path(results_json).read_text())
    text = Path(readme).read_text()
    done = []
    for track in results["tracks"]:
        pattern = re.compile(rf"(<!-- benchmark:{track}:start -->\n).*?(\n<!-- benchmark:{track}:end -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + block(results, track) + m.group(2), text)
            done.append(track)
    Path(readme).write_text(text)
    return done


if __name__ == "__main__":
    rewritten = update_readme(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[1]}: rewrote {', '.join(rewritten) or 'nothing (no markers)'}")
