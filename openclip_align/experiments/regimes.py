"""The two training regimes the benchmark and the study run in.

* ``scratch``: small models from random weights (fast; downstream numbers near chance at a CPU budget).
* ``pretrained``: ``DualCLIP-Lite0-MiniLM``, an ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2 installed
  from packages, with projection heads to a shared space. Most of both towers stays as pretrained; what
  trains (:data:`PRETRAINED_LOCKS`) was chosen for the time budget on 2 CPU cores by training
  throughput, never by held-out results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

PRETRAINED_MODEL = "DualCLIP-Lite0-MiniLM"
# Image: the last two timm groups train (block 5.3; block 6.0 + head conv), the rest is frozen with its
# ImageNet batch-norm statistics. Text: the last two of MiniLM's six layers train; frozen LayerNorms too.
PRETRAINED_LOCKS = ["--lock-image", "--lock-image-unlocked-groups", "2", "--lock-image-freeze-bn-stats",
                    "--lock-text", "--lock-text-unlocked-layers", "2", "--lock-text-freeze-layer-norm"]


@dataclass(frozen=True)
class Regime:
    name: str
    model: str
    extra: List[str] = field(default_factory=list)       # trainer flags of every run (e.g. tower locks)
    epochs: int = 2
    lr: Dict[str, float] = field(default_factory=dict)    # per optimizer (study)
    study_epochs: int = 2                                  # per grid cell (15 cells: the grid's time budget)


REGIMES = {
    "scratch": Regime("scratch", "DualCLIP-Tiny", [], 2, {"adamw": 1e-3, "adam": 1e-3, "sgd": 5e-2}),
    "pretrained": Regime("pretrained", PRETRAINED_MODEL, PRETRAINED_LOCKS, 2, {"adamw": 1e-3, "adam": 1e-3, "sgd": 5e-2},
                         study_epochs=1),
}
