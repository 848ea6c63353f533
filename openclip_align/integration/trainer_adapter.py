"""The one module that names ``open_clip_train``'s functions: each is wrapped here, and nowhere else.

``_activation`` runs the ``patch_*`` functions below as upstream's modules are imported; each replaces a
few module-level names, which ``open_clip_train.main`` then picks up through its ``from ... import``
lines (``torch.save`` and DDP are swapped on ``torch`` itself, because ``main`` may run as ``__main__``).
The wrappers only read the current run (:data:`.run_state.RUN`, started by ``parse_args``) and hand it,
with plain values and callables, to the concern modules:

=============================  =========================================================================
upstream call                  concern module
=============================  =========================================================================
``parse_args``                 :mod:`.trainer_args` (flags), :mod:`.trainer_errors` (input checks)
``create_model_and_transforms`` :mod:`.trainer_errors`, :mod:`.teacher`, :mod:`.fixed_temperature`
``get_data``                   :mod:`.data_wiring`, :mod:`.training_shards`, :mod:`.loader_health`
``create_loss``                :mod:`.loss_adapter`
``train_one_epoch``            :mod:`.before_train`, :mod:`.loader_health`
``get_clip_metrics``           :mod:`.eval_gap_metrics`
``pt_load`` / ``torch.save``   :mod:`.checkpoints`, :mod:`.ddp_resume`, :mod:`.loss_state`
``init_distributed_device``    :mod:`.ddp_cpu`
=============================  =========================================================================

This module is what would go if upstream took ``patches/open_clip-plugin-registry.patch``. All patchers
are idempotent and inert outside a trainer run (no ``parse_args`` call yet), except the flags themselves.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from openclip_align.data.errors import MissingExtrasError

from . import before_train, checkpoints, ddp_cpu, fixed_temperature, loader_health, rank_agreement, run_state
from .batch_extras import BatchStash, ExtrasLoader, WebdatasetWithExtras, make_csv_dataset_class
from .data_wiring import UpstreamData, build_data
from .ddp_resume import ddp_keys
from .eval_gap_metrics import RawFeatureTally, add_gap_metrics
from .loss_adapter import TrainerLossAdapter, build_loss
from .teacher import snapshot_teacher
from .trainer_args import parse_with_plugin
from .trainer_errors import (check_data_files_once, check_trainer_inputs, explain_checkpoint_mismatch,
                             install_excepthook)
from .training_shards import caption_filter

_FLAG = "__openclip_align_trainer_patched__"
_SAVE_FLAG = "__openclip_align_atomic_checkpoints__"


def _once(module) -> bool:
    if getattr(module, _FLAG, False):
        return False
    setattr(module, _FLAG, True)
    return True


def expand_urls(spec):
    """Upstream's expansion of a data flag (``::`` sources, brace patterns) -> (urls, weights)."""
    from open_clip_train.data import expand_urls as upstream

    return upstream(spec)


# --- open_clip: create_model_and_transforms, create_loss -------------------------------------------
def patch_open_clip_trainer_api(open_clip_module) -> None:
    """``create_loss`` / ``create_model_and_transforms`` as ``open_clip_train.main`` imports them."""
    if _once(open_clip_module.factory):
        open_clip_module.create_loss = wrap_create_loss(open_clip_module.create_loss)
        open_clip_module.create_model_and_transforms = wrap_create_model_and_transforms(
            open_clip_module.create_model_and_transforms)


def wrap_create_model_and_transforms(upstream):
    """Startup checks after distributed init (upstream loads ``--resume`` after this call), a mismatched
    ``--pretrained`` as one line, the teacher snapshot, and ``--fixed-temperature`` on the first model."""
    fixed = {"done": False}       # the first model a run creates is the one it trains (a --distill teacher is later)

    def create_model_and_transforms(model_name, pretrained=None, *args, **kwargs):
        run = run_state.RUN
        if run is not None and not run.startup_checked:
            run.startup_checked = True
            rank_agreement.watch_for_failures()
            check_data_files_once(run.args, expand_urls)
            checkpoints.fall_back_from_unreadable(run.args, run.resume_latest)
        try:
            result = upstream(model_name, pretrained, *args, **kwargs)
        except RuntimeError as err:
            if pretrained and "Error(s) in loading state_dict" in str(err):
                raise explain_checkpoint_mismatch(err, model_name, pretrained) from err
            raise
        if run is not None and run.needs_teacher and run.teacher is None:
            snapshot_teacher(run, result[0])      # as created: pretrained weights, before any resume or update
        if run is not None and not fixed["done"]:
            fixed["done"] = fixed_temperature.apply(run.args, result[0])
        return result

    create_model_and_transforms.__wrapped__ = upstream
    return create_model_and_transforms


def wrap_create_loss(upstream):
    def create_loss(args):
        run = run_state.RUN
        if run is None or run.spec is None:
            return upstream(args)
        return build_loss(run)

    create_loss.__wrapped__ = upstream
    return create_loss


# --- open_clip_train.params: parse_args -------------------------------------------------------------
def patch_params(params_module) -> None:
    if not _once(params_module):
        return
    upstream = params_module.parse_args

    def parse_args(args):
        parsed = parse_with_plugin(args, upstream)
        install_excepthook()
        check_trainer_inputs(parsed, expand_urls)
        run = run_state.start_run(parsed)
        run.raw_tally = RawFeatureTally()
        run.stash = BatchStash()
        return parsed

    parse_args.__wrapped__ = upstream
    params_module.parse_args = parse_args


# --- open_clip_train.data: get_data, and the names its pipelines look up ------------------------------
def patch_data(data_module) -> None:
    if not _once(data_module):
        return
    data_module.CsvDataset = make_csv_dataset_class(data_module.CsvDataset)
    data_module.wds = WebdatasetWithExtras(data_module.wds)
    data_module.get_data = wrap_get_data(data_module.get_data, data_module)


def wrap_get_data(upstream_get_data, data_module):
    upstream = UpstreamData(
        build_all=upstream_get_data,
        train_builder=lambda args: data_module.get_dataset_fn(args.train_data, args.dataset_type),
        builds_shards=lambda builder: builder is data_module.get_wds_dataset,
        expand=lambda spec: data_module.expand_urls(spec),            # looked up when called, as before
        source_size=lambda source: data_module.get_dataset_size(source),
        reading=functools.partial(reading_training_data, data_module))

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        return build_data(run_state.RUN, args, preprocess_fns, epoch, tokenizer, upstream)

    get_data.__wrapped__ = upstream_get_data
    return get_data


@contextlib.contextmanager
def reading_training_data(data_module, plan, drop_empty: bool):
    """While the train pipeline is built: the plan's caption rules in its sample filter (shards only), and
    descriptor exhaustion stopping the run instead of being skipped."""
    if plan is None:
        with stopping_on_fatal_read_errors(data_module):
            yield
        return
    upstream = data_module.filter_no_caption_or_no_image
    data_module.filter_no_caption_or_no_image = caption_filter(upstream, plan, drop_empty)
    try:
        with stopping_on_fatal_read_errors(data_module):
            yield
    finally:
        data_module.filter_no_caption_or_no_image = upstream


@contextlib.contextmanager
def stopping_on_fatal_read_errors(data_module):
    """While ``open_clip_train.data`` builds its pipelines, its read-error handler is
    :class:`.loader_health.StopOnFatal`. ``log_and_continue`` is looked up when a pipeline is built;
    ``tarfile_to_samples_nothrow`` binds it as a default argument, so it is given the handler explicitly, by
    :class:`.loader_health.ReadingShards`, which also stops a worker whose draws of shards all fail."""
    upstream_handler = data_module.log_and_continue
    upstream_reader = data_module.tarfile_to_samples_nothrow
    handler = loader_health.StopOnFatal(upstream_handler)
    data_module.log_and_continue = handler
    data_module.tarfile_to_samples_nothrow = loader_health.ReadingShards(upstream_reader, handler)
    try:
        yield
    finally:
        data_module.log_and_continue = upstream_handler
        data_module.tarfile_to_samples_nothrow = upstream_reader


# --- open_clip_train.train: train_one_epoch, get_clip_metrics ---------------------------------------
def patch_train(train_module) -> None:
    if _once(train_module):
        train_module.train_one_epoch = wrap_train_one_epoch(train_module.train_one_epoch)
        train_module.get_clip_metrics = wrap_get_clip_metrics(train_module.get_clip_metrics)


def wrap_train_one_epoch(upstream):
    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        run = run_state.RUN
        if run is not None and not run.attached:
            if run.spec is not None and run.uses_stash and not isinstance(data["train"].dataloader, ExtrasLoader):
                raise MissingExtrasError("the training dataloader was not built by open_clip_train's get_data, so "
                                         f"--loss {args.loss} cannot receive its per-pair extras")
            before_train.attach(run, model, optimizer, args, read_resume_checkpoint)
        if isinstance(loss, TrainerLossAdapter):
            batches = getattr(data["train"].dataloader, "num_batches", None)
            loss.start_epoch(epoch, None if batches is None else batches // max(1, args.accum_freq))
        train = data.get("train") if isinstance(data, dict) else None
        counting = None
        if train is not None:                 # for this epoch only: counts its batches (see loader_health)
            counting = train.dataloader = loader_health.CountingLoader(train.dataloader)
        try:
            result = upstream(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                              tb_writer=tb_writer)
        finally:
            if counting is not None:
                train.dataloader = counting.inner
        if counting is not None:
            loader_health.check_trained(counting, epoch)      # no evaluation or checkpoint after no step
        before_train.check_after_epoch(run, model, loss, epoch)   # every rank, before evaluation and the save
        return result

    train_one_epoch.__wrapped__ = upstream
    return train_one_epoch


def wrap_get_clip_metrics(upstream):
    def get_clip_metrics(image_features, text_features, logit_scale):
        metrics = upstream(image_features, text_features, logit_scale)
        run = run_state.RUN
        return metrics if run is None else add_gap_metrics(run, metrics, image_features, text_features)

    get_clip_metrics.__wrapped__ = upstream
    return get_clip_metrics


# --- open_clip_train.file_utils: pt_load; torch.save ---------------------------------------------------
def patch_file_utils(file_utils_module) -> None:
    """``pt_load`` (``main`` uses it only to resume): the run's resume load is read once
    (:func:`.checkpoints.load_once`) and a 1-process checkpoint resumes under DDP (:func:`.ddp_resume.ddp_keys`)."""
    if not _once(file_utils_module):
        return
    upstream = file_utils_module.pt_load

    def pt_load(file_path, map_location=None):
        args = run_state.current_args()
        if args is not None and getattr(args, "resume", None) and str(file_path) == str(args.resume):
            checkpoint, record = checkpoints.load_once(upstream, file_path, map_location=map_location)  # the resume
            run_state.RUN.resumed_records[str(file_path)] = record
        else:
            checkpoint = upstream(file_path, map_location=map_location)
        distributed = bool(getattr(args, "distributed", False)) and not getattr(args, "horovod", False)
        return ddp_keys(checkpoint, distributed)

    pt_load.__wrapped__ = upstream
    file_utils_module.pt_load = pt_load


def read_resume_checkpoint(path):
    """The resume load, made by the plugin when upstream's did not happen: the plugin's record (or None)."""
    from open_clip_train.file_utils import pt_load

    return checkpoints.load_once(getattr(pt_load, "__wrapped__", pt_load), path, map_location="cpu")[1]


def patch_torch_save(_module=None) -> None:
    """Wrap ``torch.save`` once (idempotent): a save into the current run's checkpoint folder refuses
    non-finite weights and is atomic (:func:`.checkpoints.save_checkpoint`); every other save is torch's."""
    import torch

    if getattr(torch.save, _SAVE_FLAG, False):
        return
    upstream = torch.save

    def save(obj, f, *args, **kwargs):
        run_args = run_state.current_args()
        folder = getattr(run_args, "checkpoint_path", None) if run_args is not None else None
        if not checkpoints.is_in_folder(f, folder):
            return upstream(obj, f, *args, **kwargs)
        return checkpoints.save_checkpoint(obj, Path(f), upstream, *args, **kwargs)

    setattr(save, _SAVE_FLAG, True)
    save.__wrapped__ = upstream
    save.__doc__ = upstream.__doc__
    torch.save = save


# --- open_clip_train.distributed: init_distributed_device; DDP ---------------------------------------
def patch_distributed(distributed_module) -> None:
    """Once ``init_distributed_device`` has set up a distributed run on the CPU, DDP accepts the CPU device
    (:class:`.ddp_cpu.CpuDeviceIdsDDP`); accelerator and single-process runs never see it."""
    if not _once(distributed_module):
        return
    upstream = distributed_module.init_distributed_device

    def init_distributed_device(args):
        import torch

        device = upstream(args)
        if getattr(args, "distributed", False) and not getattr(args, "horovod", False) \
                and torch.device(device).type == "cpu":
            use_cpu_device_ids_ddp()
        return device

    init_distributed_device.__wrapped__ = upstream
    distributed_module.init_distributed_device = init_distributed_device


def use_cpu_device_ids_ddp() -> None:
    """Make ``torch.nn.parallel.DistributedDataParallel`` accept a CPU device (idempotent)."""
    import torch

    if not issubclass(torch.nn.parallel.DistributedDataParallel, ddp_cpu.CpuDeviceIdsDDP):
        torch.nn.parallel.DistributedDataParallel = ddp_cpu.CpuDeviceIdsDDP
