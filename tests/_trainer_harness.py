"""Run ``open_clip_train.main`` (as ``python -m`` would) and record every loss call at full precision.

Launched by ``run_ranks`` in tests/_trainer_launch.py, as ``torchrun ... tests/_trainer_harness.py ARGS`` and
as ``python tests/_trainer_harness.py ARGS``. Upstream's main runs unchanged (with the plugin active);
the harness only adds:

* a forward hook on the training loss that appends each call's terms (float64) to
  ``$HARNESS_RECORD/rank{R}.jsonl`` (upstream's log prints 5 significant digits);
* with ``HARNESS_EMULATE_WORLD=W`` and ``HARNESS_EMULATE_BATCH=B`` (single process only): the csv
  loader's shuffle yields, in each epoch, the samples that W ranks read through ``DistributedSampler``
  in that epoch, in chunks of B rows per rank, rank 0's chunk first (the order the losses gather them).
  B is a rank's rows of one optimizer step: its batch size times ``--accum-freq``, because the loss
  sees a rank's accumulated batches concatenated.
"""
import json
import os
import runpy
import sys

import torch
from torch.utils.data import DistributedSampler, RandomSampler

RECORD = os.environ.get("HARNESS_RECORD")
WORLD = int(os.environ.get("HARNESS_EMULATE_WORLD", "0"))
BATCH = int(os.environ.get("HARNESS_EMULATE_BATCH", "0"))
_epoch = {"value": 0}


def distributed_order(n: int, epoch: int, world: int, batch: int):
    """Sample indices in the order ``world`` ranks of ``batch`` rows read them as global batches."""
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank)    # upstream's defaults
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = len(per_rank[0]) // batch
    return [i for s in range(steps) for rank in range(world) for i in per_rank[rank][s * batch:(s + 1) * batch]]


def _install_order() -> None:
    import open_clip_train.data as data

    RandomSampler.__iter__ = lambda self: iter(distributed_order(len(self.data_source), _epoch["value"], WORLD, BATCH))
    upstream_set_epoch = data.DataInfo.set_epoch

    def set_epoch(self, epoch):
        _epoch["value"] = epoch
        upstream_set_epoch(self, epoch)

    data.DataInfo.set_epoch = set_epoch


def _install_recorder() -> None:
    import open_clip_train.train as train

    upstream = train.train_one_epoch
    hooked = set()

    def train_one_epoch(model, data, loss, epoch, *args, **kwargs):
        if id(loss) not in hooked:
            hooked.add(id(loss))
            rank = int(os.environ.get("RANK", "0"))
            path = os.path.join(RECORD, f"rank{rank}.jsonl")

            def record(module, inputs, output):
                terms = output if isinstance(output, dict) else {"contrastive_loss": output}
                with open(path, "a") as sink:
                    sink.write(json.dumps({k: float(v.detach().double()) for k, v in terms.items()}) + "\n")

            loss.register_forward_hook(record)
        return upstream(model, data, loss, epoch, *args, **kwargs)

    train.train_one_epoch = train_one_epoch


if __name__ == "__main__":
    if WORLD:
        _install_order()
    if RECORD:
        _install_recorder()
    sys.argv = ["open_clip_train.main", *sys.argv[1:]]
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
