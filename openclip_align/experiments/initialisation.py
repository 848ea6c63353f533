"""The gap before any training: randomly initialised dual-tower and shared-tower models on the held-out pairs.

Mind the Gap (Liang et al., NeurIPS 2022) finds the modality gap already at initialisation (each tower maps
its inputs into a narrow cone of its own); AlignCLIP's parameter sharing is meant to remove it. For each
model and seed this measures, on the held-out pairs, the centroid gap, the alignment score, the cone (mean
intra-modality cosine, per modality) and the effective rank, with weights drawn by ``torch.manual_seed(seed)``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

INIT_KEYS = ("centroid_gap", "alignment_score", "cone_image", "cone_text", "effective_rank_image",
             "effective_rank_text")
INIT_MODELS = {"cpu": ("DualCLIP-Tiny", "SharedCLIP-Tiny"), "cuda": ("ViT-B-16", "SharedCLIP-ViT-B-16")}
INIT_COLUMNS = [("centroid_gap", "centroid gap", 3), ("alignment_score", "align. score", 3),
                ("cone_image", "cone img", 3), ("cone_text", "cone txt", 3),
                ("effective_rank_image", "eff. rank img", 1), ("effective_rank_text", "eff. rank txt", 1)]


def measure_initialisation(data_dir: Path, models: Sequence[str], seeds: Sequence[int] = (0, 1, 2, 3, 4),
                           limit: Optional[int] = None, device: str = "cpu") -> dict:
    """{model: {metric: {mean, std, values}}} over ``seeds`` on the first ``limit`` held-out pairs (all: None)."""
    import open_clip           # here, not at the top: the report and README render the table without torch
    import torch

    from openclip_align.evaluation import embed_pairs
    from openclip_align.metrics import modality_gap_report

    started = time.time()
    table: Dict[str, dict] = {}
    for name in models:
        runs: List[dict] = []
        for seed in seeds:
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
            image, text = embed_pairs(model.eval(), preprocess, open_clip.get_tokenizer(name),
                                      str(data_dir / "heldout.csv"), batch_size=128, device=device, limit=limit,
                                      progress=False)
            report = modality_gap_report(image, text, seed=0, with_separability=False)
            runs.append({key: float(report[key]) for key in INIT_KEYS} | {"pairs": report["n_pairs"]})
        table[name] = {key: {"mean": statistics.fmean(r[key] for r in runs),
                             "std": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
                             "values": [r[key] for r in runs]} for key in INIT_KEYS}
        table[name]["pairs"] = runs[0]["pairs"]
    return {"models": table, "seeds": list(seeds), "seconds": time.time() - started}


def initialisation_lines(init: Optional[dict]) -> List[str]:
    """The report's table of :func:`measure_initialisation` (empty for a run without it; one line for a run
    whose measurement failed); a ``note`` the benchmark adds follows the table."""
    if not init:
        return []
    if "models" not in init:
        return [f"Not measured: {init.get('skipped', 'no table in the results')}."]
    took = f" Measured in {init['seconds']:.0f} s." if "seconds" in init else ""
    lines = [f"Randomly initialised models (no training), held-out pairs, seeds {init['seeds']} (mean ± std): the "
             "gap Mind the Gap finds at initialisation (cone = mean cosine between two embeddings of one modality)."
             + took,
             "", "| model | pairs | " + " | ".join(c[1] for c in INIT_COLUMNS) + " |",
             "|---|---|" + "---|" * len(INIT_COLUMNS)]
    for name, row in init["models"].items():
        cells = [f"{row[key]['mean']:.{digits}f} ± {row[key]['std']:.{digits}f}" for key, _, digits in INIT_COLUMNS]
        lines.append(f"| {name} | {row['pairs']} | " + " | ".join(cells) + " |")
    return lines + (["", init["note"]] if init.get("note") else [])
