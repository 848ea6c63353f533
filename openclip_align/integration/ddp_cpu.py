"""Distributed training on CPU ranks (gloo) through ``open_clip_train.main``.

OpenCLIP 3.3 wraps the model with ``DistributedDataParallel(model, device_ids=[device])``. PyTorch
refuses ``device_ids`` for a module on the CPU (it only accepts them for accelerator modules), so a
``torchrun ... --device cpu`` run stops right after the model is built. ``device_ids=None`` is what DDP
wants there, and gloo then runs upstream's training loop unchanged.

The plugin cannot change that line of ``main`` (it may run as ``__main__`` under ``-m``, and it looks
the class up as ``torch.nn.parallel.DistributedDataParallel`` when the call happens). So, only in a
distributed run on the CPU, as soon as upstream's distributed set-up is done, ``torch.nn.parallel.
DistributedDataParallel`` becomes :class:`CpuDeviceIdsDDP` (:func:`.trainer_adapter.patch_distributed`):
a subclass that drops CPU ``device_ids`` and is otherwise DDP itself. Accelerator runs and single-process
runs never see it. ``patches/open_clip-ddp-cpu.patch`` is the upstream fix that makes this unnecessary.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def _all_cpu(devices) -> bool:
    try:
        return all(torch.device(d).type == "cpu" for d in devices)
    except (TypeError, RuntimeError):     # not device-like: let DDP itself report it
        return False


class CpuDeviceIdsDDP(DistributedDataParallel):
    """``DistributedDataParallel`` that reads ``device_ids``/``output_device`` naming the CPU as None
    (what PyTorch requires for a CPU module); every other call is passed on unchanged."""

    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids is not None and len(device_ids) > 0 and _all_cpu(device_ids):
            device_ids = None
            if output_device is not None and _all_cpu([output_device]):
                output_device = None
        super().__init__(module, device_ids, output_device, *args, **kwargs)
