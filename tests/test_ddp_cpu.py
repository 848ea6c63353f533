"""openclip_align.integration.ddp_cpu: DDP accepts a CPU device in CPU runs, and only there (issue 15)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import spawn  # noqa: E402

from openclip_align.integration import ddp_cpu, trainer_adapter  # noqa: E402


def _wrap_worker(rank, world_size, out_dir):
    """In a gloo group: plain DDP refuses device_ids=[cpu]; the subclass gives DDP's own averaged gradient."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="device_ids"):
        DistributedDataParallel(module, device_ids=[torch.device("cpu")])
    wrapped = ddp_cpu.CpuDeviceIdsDDP(module, device_ids=[torch.device("cpu")])
    assert isinstance(wrapped, DistributedDataParallel) and wrapped.device_ids is None
    x = torch.full((1, 3), float(rank + 1))
    wrapped(x).sum().backward()
    torch.save(module.weight.grad, Path(out_dir) / f"grad{rank}.pt")


def test_cpu_device_ids_give_ddp_averaged_gradients(tmp_path):
    spawn(_wrap_worker, 2, str(tmp_path))
    # d/dW sum(W x + b) = x for each output row; DDP averages x = 1 and x = 2 over the two ranks
    expected = torch.full((2, 3), 1.5)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"grad{rank}.pt"), expected)


def _fake_distributed(device, distributed, horovod=False):
    def init_distributed_device(args):
        args.distributed = distributed
        return torch.device(device)

    module = SimpleNamespace(init_distributed_device=init_distributed_device)
    trainer_adapter.patch_distributed(module)
    return module, SimpleNamespace(horovod=horovod)


@pytest.mark.parametrize("device, distributed, horovod, installed", [
    ("cpu", True, False, True),       # torchrun on the CPU: the only case that needs it
    ("cpu", False, False, False),     # one process: no DDP at all
    ("cuda:0", True, False, False),   # accelerators: upstream's DDP call is right as it is
    ("cpu", True, True, False),       # horovod wraps no DDP
])
def test_installed_only_for_distributed_cpu_runs(monkeypatch, device, distributed, horovod, installed):
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DistributedDataParallel)
    module, args = _fake_distributed(device, distributed, horovod)
    assert module.init_distributed_device(args) == torch.device(device)
    assert (torch.nn.parallel.DistributedDataParallel is ddp_cpu.CpuDeviceIdsDDP) is installed


def test_patch_is_idempotent(monkeypatch):
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DistributedDataParallel)
    module, args = _fake_distributed("cpu", True)
    wrapped = module.init_distributed_device
    trainer_adapter.patch_distributed(module)                      # a second activation changes nothing
    assert module.init_distributed_device is wrapped
    module.init_distributed_device(args)
    module.init_distributed_device(args)
    assert torch.nn.parallel.DistributedDataParallel is ddp_cpu.CpuDeviceIdsDDP
    assert ddp_cpu.CpuDeviceIdsDDP.__mro__[1] is DistributedDataParallel     # never a subclass of itself


def test_registered_for_open_clip_train_distributed():
    import open_clip_train.distributed as distributed

    assert distributed.init_distributed_device.__wrapped__.__module__ == "open_clip_train.distributed"


def test_one_process_checkpoint_gets_ddp_keys_only_in_a_ddp_run():
    from openclip_align.integration.ddp_resume import ddp_keys

    bare = {"epoch": 1, "state_dict": {"visual.proj": 1, "logit_scale": 2}, "optimizer": {"x": 3}}
    prefixed = ddp_keys(bare, distributed=True)
    assert prefixed["state_dict"] == {"module.visual.proj": 1, "module.logit_scale": 2}
    assert prefixed["optimizer"] is bare["optimizer"] and prefixed["epoch"] == 1
    assert "module.visual.proj" not in bare["state_dict"]                       # the loaded dict is not mutated
    assert ddp_keys(bare, distributed=False) is bare                             # one process: upstream's own rule
    assert ddp_keys(prefixed, distributed=True) is prefixed                      # written by DDP already
    weights_only = {"visual.proj": 1}                                            # not a train checkpoint
    assert ddp_keys(weights_only, distributed=True) is weights_only


def test_resume_patch_registered_for_open_clip_train_file_utils():
    import open_clip_train.file_utils as file_utils

    assert file_utils.pt_load.__wrapped__.__module__ == "open_clip_train.file_utils"
