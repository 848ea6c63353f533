"""Make a finished run the committed copy: the explicit step after ``make benchmark`` / ``make study``.

Runs write to untracked folders (``runs/benchmark``, ``runs/study``) so that trying the project never dirties
the repository. Publishing copies one run into the tracked folders and rewrites README's tables from them:

* benchmark: ``results.json`` (also ``baselines/<variant>.json``, what later runs are compared with),
  ``results.md`` and ``figures/`` into ``benchmark/`` for the default ``cpu`` variant, into
  ``benchmark/<variant>/`` for the others (``cpu-quick``, ``gpu``, ...);
* study: ``results.json``, ``results.md`` and ``study.png`` into ``study/``;
* temperature study: ``results.json``, ``results.md`` and ``temperature.png`` into ``study/temperature/``.

results.md and quality.png are drawn again by this version (so a run made by an older one reads like a new
one); the pair pictures are copied, or drawn again from the run's checkpoints with ``--redraw-pca DATA``.
A run from before corpus records gets one with ``--corpus DATA`` when DATA still holds as many training
pairs as the run read (marked as added at publish time).

    python -m openclip_align.publishing --benchmark runs/benchmark [--study runs/study]
        [--temperature-study runs/study-temperature] [--readme README.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

from openclip_align.experiments.benchmark import eval_rows
from openclip_align.experiments.benchmark_figures import plot_quality, replot_pca
from openclip_align.experiments.benchmark_report import markdown, write_json_atomic
from openclip_align.experiments.corpus_identity import corpus_of, corpus_record

from .readme import update_readme, update_temperature_block

MAIN_VARIANT = "cpu"


def load_results(run_dir: Path, what: str) -> dict:
    path = run_dir / "results.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: nothing to publish (run `make {what}` first; it writes {run_dir})")
    return json.loads(path.read_text())


def stamp_corpus(results: dict, data_dir: Path) -> dict:
    """Add the corpus record to a run made before records were kept, if ``data_dir`` matches its pair count."""
    if corpus_of(results) is not None:
        return results
    record = corpus_record(data_dir)
    pairs = results.get("data", {}).get("train_pairs")
    if pairs != record["train_pairs"]:
        raise SystemExit(f"--corpus {data_dir}: it holds {record['train_pairs']} training pairs but the run read "
                         f"{pairs}; it is not the corpus of this run (publish without --corpus: the run stays "
                         "'unknown corpus')")
    record["recorded_at"] = f"publish, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    results.setdefault("data", {})["corpus"] = record
    return results


def add_content(results: dict, data_dir: Path, how: str) -> dict:
    """Give a run recorded before content hashes the content hash of ``data_dir``, a build whose manifest is
    the one the run recorded (same canonical-JSON sha256): the same build, so the same pairs. ``how`` says how
    ``data_dir`` was obtained (kept in the record as ``content_note``)."""
    from openclip_align.data.content import content_of_files

    from openclip_align.experiments.corpus_identity import manifest_sha256

    record = corpus_of(results)
    manifest = data_dir / "manifest.json"
    if record is None or not record.get("sha256") or not manifest.exists():
        raise SystemExit(f"--add-content {data_dir}: needs a run with a recorded manifest sha256 and a corpus with "
                         "a manifest.json")
    manifest_data = json.loads(manifest.read_text())
    sha = manifest_sha256(manifest_data)
    if sha != record["sha256"]:
        raise SystemExit(f"--add-content {data_dir}: its manifest sha256 is {sha[:12]}, the run recorded "
                         f"{record['sha256'][:12]}: not the build the run used (rebuild it with that run's code)")
    content = content_of_files(data_dir)
    record.update(content_sha256=content["sha256"], content_order_sha256=content["order_sha256"],
                  content_pairs=content["pairs"], content_from=f"added {time.strftime('%Y-%m-%d')}",
                  content_note=how, manifest_format_version=manifest_data.get("format_version"),
                  packages=manifest_data.get("packages"))
    return results


def publish_benchmark(run_dir: Path, committed: Path, corpus: Optional[Path] = None,
                      redraw_pca: Optional[Path] = None) -> Path:
    """Copy one benchmark run into ``committed`` (see the module docstring); returns its results.json there."""
    results = load_results(run_dir, "benchmark")
    if corpus is not None:
        results = stamp_corpus(results, corpus)
    variant = results.get("variant", MAIN_VARIANT)
    target = committed if variant == MAIN_VARIANT else committed / variant
    figures = target / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for picture in sorted((run_dir / "figures").glob("pca_*.png")):
        shutil.copy2(picture, figures / picture.name)
    if redraw_pca is not None:
        for path in replot_pca(results, run_dir, redraw_pca, figures, eval_rows):
            logging.info("publish: redrew %s", path)
    plot_quality(results, figures / "quality.png")
    write_json_atomic(target / "results.json", results)
    (target / "results.md").write_text(markdown(results))
    (committed / "baselines").mkdir(parents=True, exist_ok=True)
    write_json_atomic(committed / "baselines" / f"{variant}.json", results)
    logging.info("publish: %s (%s) -> %s, baseline %s", run_dir, variant, target,
                 committed / "baselines" / f"{variant}.json")
    return target / "results.json" if variant == MAIN_VARIANT else None


def publish_study(run_dir: Path, committed: Path) -> Path:
    from openclip_align.experiments.grid_study import markdown, plot

    return _publish_folder(run_dir, committed, "study", markdown, plot, "study.png")


def publish_temperature_study(run_dir: Path, committed: Path) -> Path:
    from openclip_align.experiments.temperature_study import markdown, plot

    return _publish_folder(run_dir, committed, "study-temperature", markdown, plot, "temperature.png")


def publish_scaling_study(run_dir: Path, committed: Path, readme: Path) -> Path:
    """study/scaling/ from a finished data-scaling study, and README's ``study:scaling`` block from it."""
    from .readme import replace_block
    from openclip_align.experiments.scaling_study import check_publishable, markdown, plot, readme_block

    check_publishable(load_results(run_dir, "study-scaling"), run_dir)
    published = _publish_folder(run_dir, committed, "study-scaling", markdown, plot, "scaling.png")
    if readme.exists():
        found = replace_block(readme, "study:scaling", readme_block(json.loads(published.read_text())))
        print(f"{readme}: {'rewrote study:scaling' if found else 'no study:scaling markers'}")
    return published


def _publish_folder(run_dir: Path, committed: Path, kind: str, markdown, plot, figure: str) -> Path:
    """A study's results.json as it is; its results.md and figure drawn again by this version."""
    results = load_results(run_dir, kind)
    committed.mkdir(parents=True, exist_ok=True)
    write_json_atomic(committed / "results.json", results)
    (committed / "results.md").write_text(markdown(results))
    plot(results, committed / figure)
    logging.info("publish: %s -> %s", run_dir, committed)
    return committed / "results.json"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openclip_align.publishing",
                                     description="Make a finished run (`make benchmark` / `make study` write "
                                                 "them under runs/) the committed copy: benchmark/ or study/, and "
                                                 "README's tables.")
    parser.add_argument("--benchmark", type=Path, metavar="RUN", help="a finished benchmark run's --out folder")
    parser.add_argument("--study", type=Path, metavar="RUN", help="a finished study run's --out folder")
    parser.add_argument("--temperature-study", type=Path, metavar="RUN",
                        help="a finished temperature study's --out folder (`openclip-align study --temperatures ...`)")
    parser.add_argument("--scaling-study", type=Path, metavar="RUN",
                        help="a finished data-scaling study's --out folder (`openclip-align study --train-fractions ...`)")
    parser.add_argument("--to-scaling-study", type=Path, default=Path("study/scaling"), metavar="DIR",
                        help="the committed data-scaling study folder (default: %(default)s)")
    parser.add_argument("--to-benchmark", type=Path, default=Path("benchmark"), metavar="DIR",
                        help="the committed benchmark folder (default: %(default)s)")
    parser.add_argument("--to-study", type=Path, default=Path("study"), metavar="DIR",
                        help="the committed study folder (default: %(default)s)")
    parser.add_argument("--to-temperature-study", type=Path, default=Path("study/temperature"), metavar="DIR",
                        help="the committed temperature study folder (default: %(default)s)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"),
                        help="README whose marked tables are rewritten from what was published (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, metavar="DATA",
                        help="for a benchmark run without a corpus record: the corpus it used, recorded now")
    parser.add_argument("--add-content", type=Path, metavar="DATA",
                        help="give the published run (--to-benchmark's results.json and its baseline copy) the "
                             "content hash of DATA, a rebuild whose manifest equals the one the run recorded")
    parser.add_argument("--note", help="with --add-content: how DATA was obtained (kept in the record)")
    parser.add_argument("--redraw-pca", type=Path, metavar="DATA",
                        help="draw the pair pictures again from the run's checkpoints on this corpus's held-out pairs")
    args = parser.parse_args(argv)
    if args.add_content:
        return _add_content(parser, args)
    if not args.benchmark and not args.study and not args.temperature_study and not args.scaling_study:
        parser.error("nothing to publish: pass --benchmark RUN, --study RUN, --temperature-study RUN and/or "
                     "--scaling-study RUN")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bench = publish_benchmark(args.benchmark, args.to_benchmark, args.corpus, args.redraw_pca) \
        if args.benchmark else None
    study = publish_study(args.study, args.to_study) if args.study else None
    if (bench or study) and args.readme.exists():
        done = update_readme(args.readme, bench, study)
        print(f"{args.readme}: rewrote {', '.join(done) or 'nothing (no markers)'}")
    if args.temperature_study:
        temperature = publish_temperature_study(args.temperature_study, args.to_temperature_study)
        if args.readme.exists():
            found = update_temperature_block(args.readme, temperature)
            print(f"{args.readme}: {'rewrote study:temperature' if found else 'no study:temperature markers'}")
    if args.scaling_study:
        publish_scaling_study(args.scaling_study, args.to_scaling_study, args.readme)
    return 0


def _add_content(parser, args) -> int:
    if not args.note:
        parser.error("--add-content needs --note saying how DATA was obtained")
    results = add_content(load_results(args.to_benchmark, "benchmark"), args.add_content, args.note)
    published = args.to_benchmark / "results.json"
    baseline = args.to_benchmark / "baselines" / f"{results.get('variant', MAIN_VARIANT)}.json"
    for path in (published, baseline):
        if path == published or (path.exists() and json.loads(path.read_text()).get("created") == results["created"]):
            write_json_atomic(path, results)
            print(f"{path}: content sha256 {corpus_of(results)['content_sha256'][:12]} added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
