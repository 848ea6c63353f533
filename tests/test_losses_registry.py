"""The registry lists every loss, and each builds from a namespace made by its own add_args alone; the flags
build the same loss as the constructor called by hand; a missing loss module fails loudly."""
import argparse

import pytest
import torch

import openclip_align.losses as losses
from openclip_align.losses import get_loss_spec, loss_names
from openclip_align.losses.cyclip import CyCLIPLoss
from openclip_align.losses.distributed import DistributedConfig
from openclip_align.losses.imsep import IMSepLoss
from openclip_align.losses.onlineclr import OnlineCLRLoss
from openclip_align.losses.refine import CLIPRefineLoss
from openclip_align.losses.sogclr import SogCLRLoss
from openclip_align.losses.vicreg import VICRegLoss

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


# --- each option declared once: the flags build the same loss as the constructor called by hand -------------
def _parsed(argv, **trainer):
    from openclip_align.integration.trainer_args import build_plugin_parser

    args = build_plugin_parser().parse_args(argv)
    for key, value in trainer.items():      # what upstream's own parser would add
        setattr(args, key, value)
    return args


def _inputs(b=6, d=5):
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    return dict(image_features=torch.nn.functional.normalize(image, dim=-1),
                text_features=torch.nn.functional.normalize(text, dim=-1), logit_scale=torch.tensor(10.0),
                semantic_features=torch.randn(b, 3, generator=gen), index=torch.arange(b),
                teacher_image_features=image + 0.1, teacher_text_features=text - 0.1)


def _public(module):
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _assert_same_loss(built, by_hand):
    assert type(built) is type(by_hand)
    for a, b in zip(built.modules(), by_hand.modules(), strict=True):
        assert _public(a) == _public(b), type(a).__name__
    for (ka, va), (kb, vb) in zip(built.state_dict().items(), by_hand.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    for _ in range(2):                                    # a second step: moving averages, the next RaFA draw
        inputs = _inputs()
        torch.testing.assert_close(built(**inputs, output_dict=True), by_hand(**inputs, output_dict=True),
                                   rtol=0, atol=0)


D1 = DistributedConfig()
# name -> (command line, upstream's values, context, the constructor call that command line means)
BY_HAND = {
    "vicreg": (["--vicreg-sim-weight", "3", "--vicreg-var-weight", "4", "--vicreg-cov-weight", "0.5"], {}, {},
               lambda: VICRegLoss(sim_weight=3.0, var_weight=4.0, cov_weight=0.5, dist=D1)),
    "cyclip": (["--cyclip-inmodal-weight", "0.1", "--cyclip-crossmodal-weight", "0.7"], {}, {},
               lambda: CyCLIPLoss(inmodal_weight=0.1, crossmodal_weight=0.7, dist=D1)),
    "onlineclr": (["--onlineclr-tau-n", "0.02", "--onlineclr-tau-p", "0.3", "--onlineclr-gamma", "0.5"],
                  {"accum_freq": 2}, {},
                  lambda: OnlineCLRLoss(tau_n=0.02, tau_p=0.3, gamma=0.5, accum_freq=2, dist=D1)),
    "sogclr": (["--sogclr-gamma", "0.6", "--sogclr-tau", "0.05"], {"accum_freq": 3}, {"num_samples": 9},
               lambda: SogCLRLoss(num_samples=9, gamma=0.6, tau=0.05, accum_freq=3, dist=D1)),
    "imsep": (["--imsep-weight", "0.4", "--no-imsep-text"], {}, {},
              lambda: IMSepLoss(weight=0.4, text_term=False, dist=D1)),
    "refine": (["--hycd-alpha", "0.3", "--rafa-weight", "2", "--rafa-scale", "0.5", "--rafa-seed", "5",
                "--hycd-logit-scale", "12"], {"accum_freq": 1, "seed": 99}, {},
               lambda: CLIPRefineLoss(alpha=0.3, rafa_weight=2.0, rafa_scale=0.5, seed=5, hycd_logit_scale=12.0,
                                      dist=D1)),
}


@pytest.mark.parametrize("name", SIX)
def test_from_args_builds_the_loss_the_constructor_builds(name):
    argv, upstream, context, by_hand = BY_HAND[name]
    built = get_loss_spec(name).cls.from_args(_parsed(["--loss", name, *argv], **upstream), **context)
    _assert_same_loss(built, by_hand())


@pytest.mark.parametrize("name", SIX)
def test_from_args_with_no_flag_is_the_constructor_with_no_argument(name):
    context = {"num_samples": 9} if name == "sogclr" else {}
    built = get_loss_spec(name).cls.from_args(_parsed(["--loss", name]), **context)
    _assert_same_loss(built, get_loss_spec(name).cls(**context))


def test_refine_seed_left_out_is_the_runs_seed():
    built = CLIPRefineLoss.from_args(_parsed(["--loss", "refine"], seed=42))
    _assert_same_loss(built, CLIPRefineLoss(seed=42))
    assert CLIPRefineLoss.from_args(_parsed(["--loss", "refine", "--rafa-seed", "0"], seed=42)).rafa.seed == 0


def test_an_option_that_is_not_a_constructor_keyword_fails_at_registration():
    from openclip_align.losses.registry import register_loss

    class Typo(VICRegLoss):
        options = {"sim_wieght": "misspelt"}

    with pytest.raises(TypeError, match="'sim_wieght' is not a hyperparameter keyword of"):
        register_loss("typo", help="x")(Typo)
    assert "typo" not in losses.LOSSES


def test_the_description_is_the_class_docstrings_first_paragraph_or_an_error():
    from openclip_align.losses.registry import register_loss

    class Described(VICRegLoss):
        """Demo:   a loss whose
        description spans two lines.

        Formula and details, not part of the one-liner."""

    class Undescribed(VICRegLoss):
        pass

    Undescribed.__doc__ = None
    try:
        register_loss("described_demo")(Described)
        assert losses.LOSSES["described_demo"].help == "Demo: a loss whose description spans two lines."
        with pytest.raises(TypeError, match="give Undescribed a docstring or register it with help="):
            register_loss("undescribed_demo")(Undescribed)
        assert "undescribed_demo" not in losses.LOSSES
    finally:
        losses.LOSSES.pop("described_demo", None)


# --- the list of loss modules: one, and a missing module fails loudly -----------------------------------
def test_a_missing_loss_module_raises(monkeypatch):
    import openclip_align.losses.registry as registry

    monkeypatch.setattr(registry, "LOSS_MODULES", registry.LOSS_MODULES + ("renamed_away",))
    with pytest.raises(ModuleNotFoundError, match="openclip_align.losses.renamed_away"):
        loss_names()


def test_every_loss_module_is_listed_once_and_registers_a_loss():
    import pathlib

    import openclip_align.losses.registry as registry

    modules = sorted(p.stem for p in pathlib.Path(registry.__file__).parent.glob("*.py"))
    helpers = {"__init__", "_common", "distributed", "options", "registry"}
    assert sorted(registry.LOSS_MODULES) == sorted(set(modules) - helpers) == sorted(SIX)
    assert {get_loss_spec(n).cls.__module__.rsplit(".", 1)[1] for n in SIX} == set(registry.LOSS_MODULES)


def test_the_package_attribute_finds_a_class_no_spec_names_and_refuses_other_names():
    from openclip_align.losses.refine import HyCDLoss, RaFALoss

    assert losses.HyCDLoss is HyCDLoss and losses.RaFALoss is RaFALoss
    for name in ("NoSuchLoss", "DistributedConfig", "check_pair", "torch"):
        with pytest.raises(AttributeError):
            getattr(losses, name)


@pytest.mark.parametrize("name", SIX)
def test_the_registered_name_is_the_loss_name_its_messages_use(name):
    assert get_loss_spec(name).cls.loss_name == name
    with pytest.raises(ValueError, match=f"--loss {name}: image_features"):
        get_loss_spec(name).cls(**({"num_samples": 4} if name == "sogclr" else {}))(
            torch.zeros(3), torch.zeros(3), torch.tensor(1.0))
