"""``sizes.json``: the sample count per shard upstream reads for an epoch's size when
``--train-num-samples`` is absent."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from .errors import CorpusError

SIZES_FILE = "sizes.json"               # where upstream reads shard sizes


def check_sizes_file(source: str, urls: Sequence[str], counts: Mapping[str, int]) -> None:
    """The ``sizes.json`` upstream reads claims no more samples than the shards hold."""
    path = os.path.join(os.path.dirname(urls[0]), SIZES_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        claimed = json.load(fh)
    fix = "delete it and rerun `openclip-align data check --data SHARDS` (it writes one where there is none), or " \
          "delete it and pass --train-num-samples"
    for url in urls:
        name = os.path.basename(url)
        if name not in claimed:
            raise CorpusError(f"{path} has no entry for the training shard {name}; {fix}")
        if int(claimed[name]) > counts[url]:
            raise CorpusError(f"{path} says {url} holds {claimed[name]} samples, but it holds {counts[url]}; upstream "
                              f"would wait forever for the missing ones: {fix}")
