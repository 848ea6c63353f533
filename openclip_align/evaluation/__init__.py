"""Evaluation helpers shared by the ``gap`` command, the benchmark and the trainer: ordered data
readers, batched embedding with any OpenCLIP model, retrieval recall and zero-shot accuracy."""
from ..metrics.retrieval import retrieval_recall
from .features import embed_images, embed_pairs
from .readers import CsvImages, CsvPairs, Pair, ShardPairs, batched, expand_shards, is_shard_pattern, open_pairs
from .zero_shot import load_classnames, zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "CsvImages", "CsvPairs", "Pair", "ShardPairs", "batched", "embed_images", "embed_pairs", "expand_shards",
    "is_shard_pattern", "load_classnames", "open_pairs", "retrieval_recall", "zero_shot_accuracy",
    "zero_shot_classifier",
]
