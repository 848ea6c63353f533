"""Patchers that plug :mod:`trainer_run` into ``open_clip_train`` as its modules are imported.

Each function receives the freshly executed module and replaces a few module-level names, which
``open_clip_train.main`` then picks up through its ``from ... import`` lines. All are idempotent and
inert outside a trainer run (no ``parse_args`` call yet), except the flags themselves.
"""
from __future__ import annotations

_FLAG = "__openclip_align_trainer_patched__"


def _once(module) -> bool:
    if getattr(module, _FLAG, False):
        return False
    setattr(module, _FLAG, True)
    return True


def patch_open_clip_trainer_api(open_clip_module) -> None:
    """``create_loss`` / ``create_model_and_transforms`` as ``open_clip_train.main`` imports them."""
    from . import temperature
    from .trainer_errors import wrap_model_errors
    from .trainer_run import wrap_create_loss, wrap_create_model_and_transforms

    if _once(open_clip_module.factory):
        open_clip_module.create_loss = wrap_create_loss(open_clip_module.create_loss)
        open_clip_module.create_model_and_transforms = temperature.wrap_create_model_and_transforms(
            wrap_create_model_and_transforms(wrap_model_errors(open_clip_module.create_model_and_transforms)))


def patch_params(params_module) -> None:
    from .trainer_args import parse_args_with_plugin
    from .trainer_errors import check_trainer_inputs, install_excepthook
    from .trainer_run import start_run

    if not _once(params_module):
        return
    parse_with_flags = parse_args_with_plugin(params_module.parse_args)

    def parse_args(args):
        parsed = parse_with_flags(args)
        install_excepthook()
        check_trainer_inputs(parsed)
        start_run(parsed)
        return parsed

    parse_args.__wrapped__ = params_module.parse_args
    params_module.parse_args = parse_args


def patch_data(data_module) -> None:
    from .batch_extras import WebdatasetWithExtras, make_csv_dataset_class
    from .trainer_run import wrap_get_data

    if not _once(data_module):
        return
    data_module.CsvDataset = make_csv_dataset_class(data_module.CsvDataset)
    data_module.wds = WebdatasetWithExtras(data_module.wds)
    data_module.get_data = wrap_get_data(data_module.get_data, data_module)


def patch_train(train_module) -> None:
    from .trainer_run import wrap_get_clip_metrics, wrap_train_one_epoch

    if not _once(train_module):
        return
    train_module.train_one_epoch = wrap_train_one_epoch(train_module.train_one_epoch)
    train_module.get_clip_metrics = wrap_get_clip_metrics(train_module.get_clip_metrics)
