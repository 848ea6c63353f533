"""README's "How to read it" paragraphs, written from a benchmark's results.json (never typed by hand).

Every number is read from the published run; rows that run lacks (the post-hoc rows, the table at
initialisation of runs from before them) come from a later run kept beside it (``benchmark/<folder>/``), named
with its link. Words that judge a change ("within one seed spread") are decided from the same numbers.
"""
from __future__ import annotations

from typing import List, Optional

from openclip_align.experiments.benchmark_report import posthoc_label


def _m(track: dict, label: str, metric: str) -> Optional[dict]:
    return track["quality"].get(label, {}).get(metric)


def _pct(stat: dict, digits: int = 1) -> str:
    return f"{100 * stat['mean']:.{digits}f}"


def _num(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f}"


def spread_word(a: dict, b: dict) -> str:
    """How a change from ``a`` to ``b`` compares with the larger of their seed standard deviations."""
    change, spread = abs(b["mean"] - a["mean"]), max(a["std"], b["std"])
    if change <= spread:
        return "within one seed spread"
    return f"{change / spread:.1f}x the seed spread" if spread > 0 else "beyond the seed spread"


def _zero_shot(track: dict, label: str) -> List[str]:
    return sorted(m for m in track["quality"].get(label, {}) if m.startswith("zeroshot_"))


def _set_name(metric: str) -> str:
    return metric.replace("zeroshot_", "").replace("_top1", "")


def _moves(track: dict, before: str, after: str, metrics: List[str], scale: float, digits: int, unit: str,
           named: bool = True) -> str:
    out = []
    for metric in metrics:
        a, b = _m(track, before, metric), _m(track, after, metric)
        if a and b:
            name = f"{_set_name(metric)} " if named else ""
            out.append(f"{name}{a['mean'] * scale:.{digits}f} -> {b['mean'] * scale:.{digits}f}{unit} "
                       f"({spread_word(a, b)})")
    return ", ".join(out)


def pretrained_line(results: dict) -> Optional[str]:
    track = results["tracks"].get("pretrained")
    if not track or "CLIP" not in track["quality"] or "AlignCLIP loss" not in track["quality"]:
        return None
    heldout = ((results.get("data") or {}).get("corpus") or {}).get("heldout_pairs")
    among = f" among {heldout:,} held-out pairs" if heldout else ""
    clip, align = "CLIP", "AlignCLIP loss"
    r1 = "image_to_text_R@1"
    zs = ", ".join(f"{_pct(_m(track, clip, m))} % zero-shot {_set_name(m)}" for m in _zero_shot(track, clip))
    gap_a, gap_b = _m(track, clip, "centroid_gap"), _m(track, align, "centroid_gap")
    al_a, al_b = _m(track, clip, "alignment_score"), _m(track, align, "alignment_score")
    rank_a, rank_b = _m(track, clip, "effective_rank_image"), _m(track, align, "effective_rank_image")
    return (f"**Pretrained towers** give numbers above chance: the CLIP row reaches {_pct(_m(track, clip, r1))} % "
            f"image->text R@1{among} and {zs}. AlignCLIP's loss moves the centroid gap {_num(gap_a)} -> "
            f"{_num(gap_b)} and the alignment score {_num(al_a, 2)} -> {_num(al_b, 2)}; downstream: I->T R@1 "
            f"{_moves(track, clip, align, [r1], 100, 1, ' %', named=False)}, zero-shot "
            f"{_moves(track, clip, align, _zero_shot(track, clip), 100, 1, ' %')}. Effective rank of the image "
            f"embeddings: {_num(rank_b, 1)} against CLIP's {_num(rank_a, 1)}.")


def scratch_line(results: dict) -> Optional[str]:
    track = results["tracks"].get("scratch")
    base, align = "upstream CLIP", "AlignCLIP"
    if not track or base not in track["quality"] or align not in track["quality"]:
        return None
    g = [_m(track, row, "centroid_gap") for row in (base, align)]
    r = [_m(track, row, "image_to_text_R@1") for row in (base, align)]
    top2 = [_m(track, row, "top2_variance_share_image") for row in (base, align)]
    rank = [_m(track, row, "effective_rank_image") for row in (base, align)]
    return (f"**From scratch**, AlignCLIP moves the gap {_num(g[0], 2)} -> {_num(g[1], 2)} and image->text R@1 "
            f"{_pct(r[0])} -> {_pct(r[1])} % ({spread_word(*r)}); {_pct(top2[1], 0)} % of its image variance lies in "
            f"two principal components against {_pct(top2[0], 0)} % for upstream CLIP, at an effective rank of "
            f"{_num(rank[1], 1)} against {_num(rank[0], 1)}. Collapse and retrieval: [docs/notes.md](docs/notes.md).")


def refine_line(results: dict) -> Optional[str]:
    parts, recipe = [], None
    for name, base in (("pretrained", "CLIP"), ("scratch", "upstream CLIP")):
        track = results["tracks"].get(name)
        if not track or "CLIP-Refine" not in track["quality"] or base not in track["quality"]:
            continue
        recipe = track["plan"].get("refine_recipe") or recipe
        a, b = _m(track, base, "centroid_gap"), _m(track, "CLIP-Refine", "centroid_gap")
        downstream = [m for m in track["quality"]["CLIP-Refine"]
                      if m.startswith("zeroshot_") or m.endswith("R@1") or m.endswith("R@5")]
        largest = max(abs(_m(track, "CLIP-Refine", m)["mean"] - _m(track, base, m)["mean"]) for m in downstream
                      if _m(track, base, m))
        parts.append(f"{name}: gap {_num(a)} -> {_num(b)} ({spread_word(a, b)}), largest downstream change "
                     f"{100 * largest:.1f} points")
    if not parts or recipe is None:
        return None
    pairs = (results.get("data") or {}).get("train_pairs")
    steps = f", {pairs // recipe['batch_size']} steps of batch {recipe['batch_size']} on this corpus" if pairs else ""
    lr = f"{recipe['lr']:g}".replace("e-0", "e-")
    return (f"**CLIP-Refine** with the authors' recipe (lr {lr}{steps}): " + "; ".join(parts)
            + ". A learning-rate sweep is in [docs/notes.md](docs/notes.md). Its speed rows train at the recipe's "
            "batch, larger than the others'.")


def posthoc_line(results: dict) -> Optional[str]:
    track = results["tracks"].get("pretrained")
    row = posthoc_label("CLIP", "centre")
    if not track or row not in track["quality"]:
        return None
    gap = {label: _m(track, label, "centroid_gap") for label in
           ("CLIP", row, posthoc_label("CLIP", "standardise"), posthoc_label("CLIP", "shift"), "AlignCLIP loss")}
    r1 = [_m(track, label, "image_to_text_R@1") for label in ("CLIP", row)]
    return (f"centring the pretrained-tower CLIP takes the held-out gap from {_num(gap['CLIP'])} to {_num(gap[row])} "
            f"(AlignCLIP's loss reaches {_num(gap['AlignCLIP loss'])} by training), I->T R@1 {_pct(r1[0])} -> "
            f"{_pct(r1[1])} % ({spread_word(*r1)}); standardising and Mind the Gap's shift reach "
            f"{_num(gap[posthoc_label('CLIP', 'standardise')])} and {_num(gap[posthoc_label('CLIP', 'shift')])}.")


def initialisation_line(results: dict) -> Optional[str]:
    models = (results.get("initialisation") or {}).get("models") or {}
    if len(models) < 2:
        return None
    (dual, d), (shared, s) = list(models.items())[:2]
    return (f"at initialisation the gap is already there (`{dual}`: centroid gap {_num(d['centroid_gap'], 2)}, image "
            f"cone {_num(d['cone_image'], 2)}) and parameter sharing does not remove it (`{shared}`: "
            f"{_num(s['centroid_gap'], 2)}).")


def agreement(published: dict, kept: dict) -> str:
    """How far the kept run's trained rows are from the published ones: the largest gap and R@1 differences."""
    gaps, r1 = [], []
    for name, track in published["tracks"].items():
        other = kept["tracks"].get(name, {}).get("quality", {})
        for label, metrics in track["quality"].items():
            if label in other:
                gaps.append(abs(metrics["centroid_gap"]["mean"] - other[label]["centroid_gap"]["mean"]))
                r1.append(abs(metrics["image_to_text_R@1"]["mean"] - other[label]["image_to_text_R@1"]["mean"]))
    if not gaps:
        return ""
    if max(gaps) < 5e-4 and max(r1) < 5e-4:
        return "its trained rows repeat the published numbers"
    return (f"its trained rows are within {max(gaps):.3f} of the centroid gap and {100 * max(r1):.1f} points of I->T "
            "R@1 of the published ones")


def reading_lines(results: dict, kept: Optional[dict] = None, kept_link: str = "") -> List[str]:
    """The bullets; ``kept``/``kept_link``: a later run with the rows ``results`` lacks, and where it lies."""
    bullets = [line for line in (pretrained_line(results), scratch_line(results), refine_line(results)) if line]
    posthoc = posthoc_line(results)
    init = initialisation_line(results)
    source = ""
    if kept is not None and ((posthoc is None and posthoc_line(kept)) or (init is None and initialisation_line(kept))):
        posthoc, init = posthoc or posthoc_line(kept), init or initialisation_line(kept)
        busy = any(track.get("speed_method", {}).get("busy") for track in kept["tracks"].values())
        why = "its speed windows ran on a busy machine, so it is not the published baseline" if busy else \
            "it is not the published baseline"
        close = agreement(results, kept)
        source = (f" The tables below are the published run of {results['created'][:10]}, which lacks some of "
                  f"these rows; the run of {kept['created'][:10]} that has them is kept in [{kept_link}]({kept_link}) "
                  f"({close + '; ' if close else ''}{why}). What it shows:")
    if posthoc or init:
        bullets.append("**Closing the gap for free.** `make benchmark` also scores every trained CLIP and AlignCLIP "
                       "row after three post-hoc transforms fitted on its training pairs, no training (rows `+ "
                       "centring`, `+ standardising`, `+ gap shift`), and measures the gap of randomly initialised "
                       "dual- and shared-tower models." + source + " "
                       + " ".join(s[0].upper() + s[1:] for s in (posthoc, init) if s)
                       + " Per-paper reading: [docs/notes.md](docs/notes.md).")
    return ["How to read it (written from the results by the generator):", ""] + [f"* {b}" for b in bullets]


def _speed(results: dict, track: str, label: str) -> Optional[dict]:
    tracks = results["tracks"] if "tracks" in results else {"scratch": results}     # runs from before tracks
    return (tracks.get(track) or {}).get("speed", {}).get(label)


def speed_line(cpu: dict, gpu: Optional[dict] = None, gpu_link: str = "") -> str:
    """The GPU run's ratios (if one is kept) and the CPU tables' AlignCLIP / SharedCLIP and CLIP-Refine ratios."""
    parts = []
    if gpu is not None:
        align, shared = _speed(gpu, "scratch", "AlignCLIP"), _speed(gpu, "scratch", "SharedCLIP")
        refine = _speed(gpu, "scratch", "CLIP-Refine")
        if align and shared and refine:
            parts.append(f"The last GPU run ({gpu['created'][:10]}) is kept in [{gpu_link}]({gpu_link}): AlignCLIP "
                         f"{align['samples_per_second'] / shared['samples_per_second']:.2f}x SharedCLIP, CLIP-Refine "
                         f"{refine['ratio_to_upstream']:.2f}x upstream CLIP.")
    align, shared = _speed(cpu, "scratch", "AlignCLIP"), _speed(cpu, "scratch", "SharedCLIP")
    if align and shared:
        parts.append(f"On CPU (tables above): AlignCLIP trains at "
                     f"{align['samples_per_second'] / shared['samples_per_second']:.2f}x SharedCLIP "
                     f"({align['samples_per_second']:.1f} vs {shared['samples_per_second']:.1f} samples/s)")
    refine = [(name, _speed(cpu, name, "CLIP-Refine")) for name in ("scratch", "pretrained")]
    refine = [f"{s['ratio_to_upstream']:.2f}x in the {name} track" for name, s in refine if s]
    if refine:
        parts[-1:] = [(parts[-1] + "; " if parts and parts[-1].startswith("On CPU") else "On CPU: ")
                      + "CLIP-Refine runs at " + " and ".join(refine) + " (ratio to each track's first row)."]
    return " ".join(parts)
