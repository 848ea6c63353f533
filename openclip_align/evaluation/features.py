"""Embed evaluation data with any OpenCLIP model (upstream or plugin): batched, in order, normalised.

Features come back as float32 CPU tensors, L2-normalised, row i = sample i of the data.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from .readers import Pair, batched, open_pairs


def _unwrap(model):
    """DistributedDataParallel / DataParallel hide ``encode_image`` behind ``.module``."""
    return model.module if not hasattr(model, "encode_image") and hasattr(model, "module") else model


def _input_dtype(model) -> torch.dtype:
    """Images must match the dtype of the image tower's weights (fp16/bf16 models get fp16/bf16 pixels).

    Low-precision OpenCLIP models keep some tensors (class/positional embeddings) in float32, so look
    at the first convolution or linear layer rather than at the first parameter.
    """
    tower = getattr(model, "visual", model)
    for module in tower.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.is_floating_point():
            return module.weight.dtype
    for param in tower.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _as_pair(item) -> Pair:
    if isinstance(item, Pair):
        return item
    image, caption = item[0], item[1]
    return Pair(image, str(caption))


def _progress(iterable, total, desc, enabled):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not enabled)


def _total_batches(data, limit, batch_size):
    try:
        n = len(data)
    except TypeError:
        n = None
    if limit is not None:
        n = limit if n is None else min(n, limit)
    return None if n is None else -(-n // batch_size)


@torch.inference_mode()
def embed_pairs(model, preprocess, tokenizer, data, batch_size: int = 64, device="cpu",
                limit: Optional[int] = None, progress: bool = True,
                normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features) of the pairs in ``data``, each N x D, float32, on CPU;
    L2-normalised unless ``normalize=False`` (raw features, e.g. for their norms).

    ``data`` is a CSV path or shard pattern (see :func:`open_pairs`), or any iterable of
    :class:`Pair` / ``(PIL image, caption)``; ``limit`` keeps the first N pairs.
    """
    model = _unwrap(model)
    model.eval()
    device = torch.device(device)
    dtype = _input_dtype(model)
    source = open_pairs(data, limit=limit) if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") else data
    items = source if limit is None else islice(source, limit)
    images_out, texts_out = [], []
    for batch in _progress(batched(map(_as_pair, items), batch_size), _total_batches(source, limit, batch_size),
                           "embedding pairs", progress):
        pixels = torch.stack([preprocess(p.image) for p in batch]).to(device=device, dtype=dtype)
        tokens = tokenizer([p.caption for p in batch]).to(device)
        image_features, text_features = model.encode_image(pixels).float(), model.encode_text(tokens).float()
        if normalize:
            image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        images_out.append(image_features.cpu())
        texts_out.append(text_features.cpu())
    if not images_out:
        raise ValueError("no pairs to embed: the data is empty")
    return torch.cat(images_out), torch.cat(texts_out)


@torch.inference_mode()
def embed_images(model, preprocess, data: Iterable, batch_size: int = 64, device="cpu",
                 limit: Optional[int] = None, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image_features N x D float32 CPU normalised, labels N int64) of ``(image, label)`` items,
    e.g. a :class:`~openclip_align.evaluation.readers.CsvImages`."""
    model = _unwrap(model)
    model.eval()
    device = torch.device(device)
    dtype = _input_dtype(model)
    items = data if limit is None else islice(data, limit)
    feats, labels = [], []
    for batch in _progress(batched(items, batch_size), _total_batches(data, limit, batch_size),
                           "embedding images", progress):
        pixels = torch.stack([preprocess(image) for image, _ in batch]).to(device=device, dtype=dtype)
        feats.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
        labels.extend(int(label) for _, label in batch)
    if not feats:
        raise ValueError("no images to embed: the data is empty")
    return torch.cat(feats), torch.tensor(labels, dtype=torch.int64)
