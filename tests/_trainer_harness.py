"""Run ``open_clip_train.main`` (as ``python -m`` would), recording every loss call at full precision or
arranging a fault on one rank.

Launched through tests/_trainer_launch.py (``run_ranks``; test_rank_agreement's two nodes), as
``torchrun ... tests/_trainer_harness.py ARGS`` and as ``python tests/_trainer_harness.py ARGS``.
Upstream's main runs unchanged (with the plugin active); the harness only adds:

* a forward hook on the training loss that appends each call's terms (float64) to
  ``$HARNESS_RECORD/rank{R}.jsonl`` (upstream's log prints 5 significant digits);
* with ``HARNESS_EMULATE_WORLD=W`` and ``HARNESS_EMULATE_BATCH=B`` (single process only): the csv
  loader's shuffle yields, in each epoch, the samples that W ranks read through ``DistributedSampler``
  in that epoch, in chunks of B rows per rank, rank 0's chunk first (the order the losses gather them).
  B is a rank's rows of one optimizer step: its batch size times ``--accum-freq``, because the loss
  sees a rank's accumulated batches concatenated;
* with ``HARNESS_FAULT`` on the rank ``HARNESS_FAULT_RANK`` only: ``weights``, its weights turn NaN after
  its optimizer step (its loss was finite); ``loss``, its plugin loss returns NaN terms.
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
FAULT = os.environ.get("HARNESS_FAULT", "")
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


def _install_fault() -> None:
    if FAULT == "weights":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def poison(optimizer, args, kwargs):
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

        register_optimizer_step_post_hook(poison)
    elif FAULT == "loss":
        from torch.nn.modules.module import register_module_forward_hook

        def nan_terms(module, inputs, output):
            if type(module).__module__.startswith("openclip_align.losses.") and isinstance(output, dict):
                return {key: value * float("nan") for key, value in output.items()}
            return output

        register_module_forward_hook(nan_terms)


if __name__ == "__main__":
    if FAULT and os.environ.get("HARNESS_FAULT_RANK") == os.environ.get("RANK"):
        _install_fault()
    if WORLD:
        _install_order()
    if RECORD:
        _install_recorder()
    sys.argv = ["open_clip_train.main", *sys.argv[1:]]
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
