"""The registry lists every loss, and each builds from a namespace made by its own add_args alone."""
import argparse

import pytest
import torch

import openclip_align.losses as losses
from openclip_align.losses import get_loss_spec, loss_names

SIX = ("imsep", "refine", "sogclr", "cyclip", "vicreg", "onlineclr")
# flag -> the authors' default (docs/methods.md: AlignCLIP, CLIP-Refine, course-study losses)
DEFAULTS = {
    "imsep": {"imsep_weight": 0.25, "imsep_text": True},   # the authors' released script
    "refine": {"hycd_alpha": 0.5, "rafa_weight": 1.0, "rafa_scale": 1.0},
    "sogclr": {"sogclr_gamma": 0.8, "sogclr_tau": 0.01},
    "cyclip": {"cyclip_inmodal_weight": 0.25, "cyclip_crossmodal_weight": 0.25},
    "vicreg": {"vicreg_sim_weight": 25.0, "vicreg_var_weight": 25.0, "vicreg_cov_weight": 1.0},
    "onlineclr": {"onlineclr_tau_n": 0.01, "onlineclr_tau_p": 0.1, "onlineclr_gamma": 0.8},
}
SPEC_FLAGS = {  # name -> (needs, stateful, raw_features)
    "imsep": ({"semantic"}, False, False), "refine": (set(), True, True), "sogclr": ({"index"}, True, False),
    "cyclip": (set(), False, False), "vicreg": (set(), False, True), "onlineclr": (set(), True, False),
}
CLASSES = {"imsep": "IMSepLoss", "refine": "CLIPRefineLoss", "sogclr": "SogCLRLoss", "cyclip": "CyCLIPLoss",
           "vicreg": "VICRegLoss", "onlineclr": "OnlineCLRLoss"}


def own_namespace(name, argv=()):
    parser = argparse.ArgumentParser()
    get_loss_spec(name).cls.add_args(parser.add_argument_group(name))
    return parser.parse_args(list(argv))


def test_loss_names_lists_clip_first_and_all_six():
    names = loss_names()
    assert names[0] == "clip" and sorted(names[1:]) == sorted(SIX) and len(names) == 7


@pytest.mark.parametrize("name", SIX)
def test_spec_defaults_and_from_args(name):
    spec = get_loss_spec(name)
    assert spec.cls.__name__ == CLASSES[name] and getattr(losses, CLASSES[name]) is spec.cls
    assert (set(spec.needs), spec.stateful, spec.raw_features) == SPEC_FLAGS[name]
    args = own_namespace(name)
    for dest, default in DEFAULTS[name].items():
        assert getattr(args, dest) == default
    loss = spec.cls.from_args(args, num_samples=16)
    assert isinstance(loss, torch.nn.Module)
    assert loss.dist.world_size == 1 and not loss.dist.local_loss and not loss.dist.gather_with_grad
    assert bool(loss.state_dict()) == spec.stateful


def test_flags_reach_the_loss():
    loss = get_loss_spec("imsep").cls.from_args(own_namespace("imsep", ["--imsep-weight", "0.2", "--no-imsep-text"]))
    assert loss.weight == 0.2 and not loss.text_term
    loss = get_loss_spec("sogclr").cls.from_args(own_namespace("sogclr", ["--sogclr-tau", "0.05"]), num_samples=3)
    assert loss.tau == 0.05 and loss.gamma == 0.8


@pytest.mark.parametrize("name", SIX)
def test_trainer_distributed_flags_are_read_and_horovod_refused(name):
    args = own_namespace(name)
    args.rank, args.world_size, args.local_loss, args.gather_with_grad, args.horovod = 1, 4, True, True, False
    loss = get_loss_spec(name).cls.from_args(args, num_samples=16)
    d = loss.dist
    assert (d.rank, d.world_size, d.local_loss, d.gather_with_grad) == (1, 4, True, True)
    args.horovod = True
    with pytest.raises(NotImplementedError, match="horovod"):
        get_loss_spec(name).cls.from_args(args, num_samples=16)
