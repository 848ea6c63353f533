"""README's "At scale" table is generated from measurements/scale_startup.json, never written by hand (issue 23).

A hand-made result of two sizes, with expectations worked out by hand: a row that changes by more than the
noise between the sizes is extrapolated along the straight line through them to 10M samples, one within it
is not; only the text between the README markers changes."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "measurements"))
import scale_startup  # noqa: E402


def _result(samples, upstream, plugin, imsep, sogclr, rss_plugin, check_s):
    return {"samples": samples, "shards": samples // 100, "write_s": 1.0, "embed_captions_per_s": 100.4,
            "data_check_s": check_s, "column_bytes_per_sample": 800.0,
            "clip, upstream": {"seconds": upstream, "peak_rss_mib": 1000.0},
            "clip, plugin": {"seconds": plugin, "peak_rss_mib": rss_plugin},
            "imsep, plugin": {"seconds": imsep, "peak_rss_mib": 1020.0},
            "sogclr, plugin": {"seconds": sogclr, "peak_rss_mib": 1030.0},
            "load_average_1min": {"before": 0.5, "during_max": 1.5}}


RESULTS = [_result(1000, 10.0, 10.5, 11.0, 10.8, 1010.0, 1.0),
           _result(11000, 10.2, 20.5, 21.0, 20.9, 1500.0, 11.0)]


def _rows(text):
    """Table rows of the block: label -> cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_block_between_the_markers_is_replaced_from_the_json(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark:scale:start -->\nOLD TABLE\n<!-- benchmark:scale:end -->\noutro\n")
    (tmp_path / "scale.json").write_text(json.dumps(RESULTS))
    subprocess.run([sys.executable, str(ROOT / "measurements" / "scale_startup.py"), "--report-only",
                    "--out", str(tmp_path / "scale.md"), "--readme", str(readme)], check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- benchmark:scale:start -->\n`python measurements/scale_startup.py --sizes "
                           "1000 11000`")
    assert "OLD TABLE" not in text and text.endswith("\n<!-- benchmark:scale:end -->\noutro\n")
    rows = _rows(text)
    # clip with the plugin: 0.5 s over upstream at 1,000 samples, 10.3 s at 11,000; slope 9.8 s per 10,000
    # samples, so at 10M: 10.3 + 9.8 * (10,000,000 - 11,000) / 10,000 = 9,799.52
    assert rows["plugin adds, clip (s)"] == ["0.5", "10.3", "9799.5"]
    assert rows["imsep adds over clip (s)"] == ["0.5", "0.5", "no growth beyond noise (+-3)"]
    assert rows["first step, clip, upstream (s)"] == ["10.0", "10.2", "no growth beyond noise (+-3)"]
    # 1 s -> 11 s: 1 ms per sample, 11 + 9,989 = 10,000 s at 10M
    assert rows["`openclip-align data check --workers 2` (s, once per dataset)"] == ["1.0", "11.0", "10000.0"]
    # 1010 -> 1500 MiB (beyond the 100 MiB noise): 1500 + 0.049 * 9,989,000 = 490,961
    assert rows["peak RSS before step 1, clip, plugin (MiB)"] == ["1010", "1500", "490961"]
    assert rows["peak RSS before step 1, imsep, plugin (MiB)"] == ["1020", "1020", "no growth beyond noise (+-100)"]
    assert rows["embedding column, bytes per sample"] == ["800.0", "800.0", "800.0"]
    assert rows["`openclip-align embed` all-MiniLM-L6-v2, captions/s (one shard, model load included)"] == \
        ["100", "100", "-"]
    # the .md beside the json holds the same table
    assert _rows((tmp_path / "scale.md").read_text()) == rows


def test_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    assert not scale_startup.update_readme(readme, RESULTS, "2 CPU cores")
    assert readme.read_text() == "no block here\n"


def test_committed_readme_shows_the_committed_measurement():
    """README's block is the committed json rendered (its table rows; the header names the machine)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- benchmark:scale:start -->\n(.*?)<!-- benchmark:scale:end -->", text, re.S)
    assert block, "README has the benchmark:scale block"
    results = json.loads((ROOT / "measurements" / "scale_startup.json").read_text())
    assert _rows(block.group(1)) == _rows("\n".join(scale_startup.table(results)))
    assert _rows(block.group(1)) == _rows((ROOT / "measurements" / "scale_startup.md").read_text())
