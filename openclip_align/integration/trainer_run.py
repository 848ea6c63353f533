"""What the plugin does inside one ``open_clip_train.main`` run, step by step.

Upstream's ``main`` calls, in order: ``parse_args`` -> ``create_model_and_transforms`` -> (resume)
-> ``get_data`` -> ``create_loss`` -> ``train_one_epoch`` / ``evaluate`` -> ``torch.save``. The
wrappers below hook into those calls; :class:`TrainerRun` holds what they share. With
``--loss clip`` they only record the loss name; upstream's computation is untouched.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openclip_align.data.errors import MissingExtrasError
from openclip_align.losses._common import inputs_validated
from openclip_align.losses.registry import NEEDS_INDEX, NEEDS_SEMANTIC

from . import batch_extras, checkpoints, data_checks, rank_agreement, run_state, training_shards
from . import loader_health
from .batch_extras import STASH, ExtrasLoader
from .checkpoints import fall_back_from_unreadable
from .run_state import CAPTION, INDEX, SEMANTIC, TrainerRun
from .trainer_errors import check_data_files_once
from .trainer_args import loss_option_names

CHECKPOINT_KEY = checkpoints.PLUGIN_KEY     # stored inside checkpoint["optimizer"] (see docs/how-it-hooks-in.md)


def start_run(args) -> TrainerRun:
    run = run_state.start_run(args)
    run.raw_tally = RawFeatureTally()
    return run


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)             # DDP
    return getattr(model, "_orig_mod", model)           # torch.compile


# --- model creation: snapshot the teacher ------------------------------------------------------
def wrap_create_model_and_transforms(upstream):
    def create_model_and_transforms(*args, **kwargs):
        run = run_state.RUN
        if run is not None and not getattr(run, "startup_checked", False):
            run.startup_checked = True       # distributed init is done; upstream loads --resume after this call
            rank_agreement.watch_for_failures()
            check_data_files_once(run.args)
            fall_back_from_unreadable(run.args, run.resume_latest)
        result = upstream(*args, **kwargs)
        if run is not None and run.needs_teacher and run.teacher is None:
            # the model as created (pretrained weights, before any resume or update) is the teacher
            teacher = copy.deepcopy(result[0]).eval().requires_grad_(False)
            run.teacher = teacher
            run.teacher_sha256 = state_fingerprint(teacher)
            logging.info("openclip-align: frozen teacher for --loss %s taken from the starting model (sha256 %s)",
                         run.args.loss, run.teacher_sha256[:12])
        return result

    create_model_and_transforms.__wrapped__ = upstream
    return create_model_and_transforms


def state_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- data: make the training batches carry the extras ------------------------------------------
def wrap_get_data(upstream_get_data, data_module):
    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        run = run_state.RUN
        if run is None or not args.train_data or args.dataset_type == "synthetic":
            if run is not None and run.uses_stash and args.dataset_type == "synthetic":
                raise MissingExtrasError(f"--loss {args.loss} needs captions/indices; synthetic data has none")
            return upstream_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        dataset_fn = data_module.get_dataset_fn(args.train_data, args.dataset_type)
        plan = None
        if dataset_fn is data_module.get_wds_dataset:       # no shard is opened here: see training_shards
            plan = training_shards.plan_training_shards(args, run.data_extras(), data_module)
            for note in plan.notes:
                logging.info("openclip-align: %s", note)
        drop_empty = bool(getattr(args, "drop_empty_captions", False))
        if not run.uses_stash:
            with training_shards.filtering_captions(data_module, plan, drop_empty), \
                    loader_health.stopping_on_fatal_read_errors(data_module):
                data = upstream_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            if "train" in data:
                data_checks.check_has_a_batch(args, data["train"])
            return data
        source = args.semantic_source
        options = dict(csv_index_key=args.csv_index_key, csv_embeddings=None if plan else args.semantic_embeddings,
                       semantic_precomputed=source != "on-the-fly", semantic_on_the_fly=source != "precomputed")
        if plan is not None:
            options["shard_extras"] = training_shards.ShardSampleExtras(plan, run.data_extras(), source)
            run.semantic_width = plan.width
        with batch_extras.requesting(run.data_extras(), **options), \
                training_shards.filtering_captions(data_module, plan, drop_empty), \
                loader_health.stopping_on_fatal_read_errors(data_module):
            train = dataset_fn(args, preprocess_fns[0], is_train=True, epoch=epoch, tokenizer=tokenizer)
        data_checks.check_has_a_batch(args, train)
        if NEEDS_SEMANTIC in run.needs and plan is None:
            data_checks.log_csv_on_the_fly(args, train)
        train.dataloader = ExtrasLoader(train.dataloader)
        run.num_train_samples = plan.total if plan is not None else _dataset_size(args, train, data_module)
        indices = getattr(getattr(train.dataloader, "dataset", None), "indices", None)
        if NEEDS_INDEX in run.needs and indices is not None and run.num_train_samples:
            batch_extras.check_index_range(f"--loss {args.loss}: {args.train_data}", indices, run.num_train_samples)
        saved = args.train_data
        args.train_data = None          # upstream builds val / imagenet exactly as before
        try:
            data = upstream_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        finally:
            args.train_data = saved
        return {"train": train, **data}

    get_data.__wrapped__ = upstream_get_data
    return get_data


def _dataset_size(args, train, data_module) -> Optional[int]:
    """Number of distinct pairs (sizes the per-sample state of losses like SogCLR)."""
    dataset = getattr(train.dataloader, "dataset", None)
    if dataset is not None and not isinstance(dataset, torch.utils.data.IterableDataset):
        return len(dataset)                                  # csv: one row per pair
    return training_shards.shards_size(args.train_data, data_module)


# --- the loss ------------------------------------------------------------------------------------
def wrap_create_loss(upstream_create_loss):
    def create_loss(args):
        run = run_state.RUN
        if run is None or run.spec is None:
            return upstream_create_loss(args)
        loss = run.spec.cls.from_args(args, num_samples=run.num_train_samples)
        run.loss_module = TrainerLossAdapter(run, loss)
        logging.info("openclip-align: --loss %s (%s)", run.spec.name, type(loss).__name__)
        return run.loss_module

    create_loss.__wrapped__ = upstream_create_loss
    return create_loss


class NonFiniteWatch:
    """Whether a loss term was ever NaN/inf, accumulated on the device without reading anything back.

    :meth:`record` costs a few tiny kernels and no synchronisation; :meth:`read` brings the record to the
    host (one device-to-host synchronisation), which the adapter does only at log steps, at the end of
    an epoch and before a checkpoint is written.
    """

    def __init__(self):
        self.names: Optional[Tuple[str, ...]] = None
        self._bad = None           # (terms + 1,) bool: term k (last: their sum) was non-finite at least once
        self._first = None         # the values of the first recorded call with a non-finite one
        self._first_call = None    # that call's number (1-based); 0 while there is none
        self._calls = None         # calls recorded, counted on the device

    def record(self, terms: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        names = tuple(terms) + ("sum of the terms",)
        values = torch.stack([v.detach().float().reshape(()) for v in (*terms.values(), total)])
        if names != self.names:
            if self.names is not None and self.read() is not None:
                return             # keep the earlier record; the next read reports it
            self.names = names
            self._bad = torch.zeros(len(names), dtype=torch.bool, device=values.device)
            self._first = torch.zeros_like(values)
            self._calls = torch.zeros((), dtype=torch.int64, device=values.device)
            self._first_call = torch.zeros_like(self._calls)
        self._calls += 1
        nonfinite = ~torch.isfinite(values)
        newly = nonfinite.any() & ~self._bad.any()
        self._first = torch.where(newly, values, self._first)
        self._first_call = torch.where(newly, self._calls, self._first_call)
        self._bad |= nonfinite

    def read(self) -> Optional[Tuple[List[str], Dict[str, float], int]]:
        """None while every recorded value was finite, else (non-finite terms, the values of the first call
        with one, that call's number)."""
        if self._bad is None:
            return None
        bad = self._bad.tolist()
        if not any(bad):
            return None
        values = dict(zip(self.names, self._first.tolist()))
        return [n for n, b in zip(self.names, bad) if b], values, int(self._first_call)


class TeacherEncoder(nn.Module):
    """The frozen teacher's image and text features in one call (one module to hand to ``torch.compile``)."""

    def __init__(self, teacher: nn.Module, normalize: bool):
        super().__init__()
        self.teacher = teacher
        self.normalize = normalize

    def forward(self, images, texts):
        return (self.teacher.encode_image(images, normalize=self.normalize),
                self.teacher.encode_text(texts, normalize=self.normalize))


class TrainerLossAdapter(nn.Module):
    """Calls a registry loss the way upstream's trainer calls ClipLoss, adding what it needs.

    Pulls the batch's extras from the stash (semantic embeddings, indices; validated on the host before
    step 1, moved with ``non_blocking``), embeds captions on the fly when asked to, runs the frozen
    teacher, and records on the device whether the loss was non-finite. Nothing in a step reads a value
    back from the device: the record is read at log steps (``--log-every-n-steps``), at the end of each
    epoch and before any checkpoint is written, and a non-finite loss then stops the run with an error
    naming the terms, before a checkpoint of the diverged model exists.
    """

    def __init__(self, run: TrainerRun, loss: nn.Module):
        super().__init__()
        self.run = run
        self.loss = loss
        self.watch = NonFiniteWatch()
        self._device = None
        self._cache_key = None
        self._cache: Dict[str, torch.Tensor] = {}
        self._calls = 0                         # loss calls in this process
        self._epoch_calls = 0                   # ... in the current epoch
        self._batches_per_epoch: Optional[int] = None
        self._epochs: List[Tuple[int, int]] = []     # (calls before the epoch, epoch)

    def place(self, device) -> None:
        """Move the loss (and its state) to the training device, once."""
        self.loss.to(device)
        self._device = torch.device(device)

    def start_epoch(self, epoch: int, batches_per_epoch: Optional[int]) -> None:
        self._epoch_calls = 0
        self._batches_per_epoch = batches_per_epoch
        self._epochs.append((self._calls, epoch))

    def _per_step_inputs(self, batch, device) -> Dict[str, torch.Tensor]:
        # the loss runs accum_freq times per step on the same batches: compute these once
        key = batch["generation"]
        if key == self._cache_key:
            return self._cache
        run, out = self.run, {}
        if NEEDS_SEMANTIC in run.needs:
            if SEMANTIC in batch:
                out["semantic_features"] = batch[SEMANTIC].to(device=device, dtype=torch.float32, non_blocking=True)
            elif run.args.semantic_source != "precomputed" and CAPTION in batch:
                out["semantic_features"] = _embed_on_the_fly(run, batch[CAPTION], device)
            else:
                raise MissingExtrasError(
                    f"--loss {run.args.loss}: this batch has no semantic embeddings (and no raw captions to "
                    "embed on the fly); see `openclip-align embed`")
        if NEEDS_INDEX in run.needs:
            if INDEX not in batch:
                raise MissingExtrasError(f"--loss {run.args.loss} needs a per-pair dataset index; the batch has none")
            out["index"] = batch[INDEX].to(device, non_blocking=True)
        if run.needs_teacher:
            encoder = run.teacher_encoder if run.teacher_encoder is not None else prepare_teacher(run, None, device)
            images, texts = batch["images"], batch["texts"]
            if images.device != device:          # not the model's own inputs (see BatchStash.record_model_inputs)
                from open_clip import get_input_dtype

                images = images.to(device=device, dtype=get_input_dtype(run.args.precision), non_blocking=True)
                texts = texts.to(device, non_blocking=True)
            with torch.no_grad():                # under the trainer's autocast, like the student
                out["teacher_image_features"], out["teacher_text_features"] = encoder(images, texts)
        self._cache_key, self._cache = key, out
        return out

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        run = self.run
        device = image_features.device
        if device != self._device:               # normally done before step 1 (see _attach)
            self.place(device)
        inputs = {}
        if run.needs or run.needs_teacher:
            batch = STASH.take(image_features.shape[0])
            inputs = self._per_step_inputs(batch, device)
        with inputs_validated():                 # extras were checked on the host before step 1
            terms = self.loss(image_features, text_features, logit_scale, output_dict=True, **inputs, **kwargs)
        total = sum(terms.values())
        self.watch.record(terms, total)
        self._calls += 1
        self._epoch_calls += 1
        if self._at_log_step():
            self.check_finite()                  # upstream reads the loss back at this step anyway
        return terms if output_dict else total

    def _at_log_step(self) -> bool:
        """Whether this call ends a step that upstream's train_one_epoch logs (its own rule)."""
        args = self.run.args
        accum = max(1, int(getattr(args, "accum_freq", 1) or 1))
        if self._epoch_calls % accum:
            return False
        step = self._epoch_calls // accum - 1
        every = max(1, int(getattr(args, "log_every_n_steps", 100) or 1))
        return step % every == 0 or step + 1 == self._batches_per_epoch

    def check_finite(self, shared: bool = True) -> None:
        """Raise if any loss value so far was NaN/inf (one device sync): at log steps, at the end of an
        epoch and before a checkpoint is written, so that no checkpoint of a diverged model exists.
        ``shared``: called on every rank at the same step, so all ranks stop together (rank_agreement)."""
        problem = self.problem()
        if shared:
            rank_agreement.agree(problem, FloatingPointError)
        elif problem is not None:
            raise FloatingPointError(problem)

    def problem(self) -> Optional[str]:
        """None while every loss value was finite, else what became non-finite, where, and what to do."""
        found = self.watch.read()
        if found is None:
            return None
        names, values, call = found
        return (f"--loss {self.run.args.loss} became non-finite ({', '.join(names)}) {self._where(call)}: "
                f"{values}; stopping before any checkpoint of the diverged model is written, so the checkpoints "
                "already written stay intact. Try a lower --lr or --precision fp32.")

    def _where(self, call: int) -> str:
        before, epoch = max(((b, e) for b, e in self._epochs if b < call), default=(0, None))
        accum = max(1, int(getattr(self.run.args, "accum_freq", 1) or 1))
        step = (call - before - 1) // accum
        return f"first at step {step} of epoch {epoch}" if epoch is not None else f"first at call {call}"


def prepare_teacher(run: TrainerRun, student: Optional[nn.Module], device) -> nn.Module:
    """Once per run: the teacher on the student's device with the student's dtypes and memory format,
    under ``torch.compile`` when the student is compiled (``--torchcompile``)."""
    teacher = run.teacher
    if student is not None:
        _match_tensors(teacher, student)
    elif device is not None:
        teacher.to(device)
    encoder = TeacherEncoder(teacher, normalize=not run.spec.raw_features)
    if getattr(run.args, "torchcompile", False):
        encoder = torch.compile(encoder)
    run.teacher_encoder = encoder
    return encoder


def _match_tensors(teacher: nn.Module, student: nn.Module) -> None:
    """Give each teacher parameter / buffer the device, dtype and memory format of the student's
    tensor of the same name (the teacher is a copy of the student as created, so the names agree)."""
    theirs = dict(itertools.chain(student.named_parameters(), student.named_buffers()))
    with torch.no_grad():
        for name, tensor in itertools.chain(teacher.named_parameters(), teacher.named_buffers()):
            reference = theirs.get(name)
            if reference is None or reference.shape != tensor.shape:
                continue
            channels_last = (reference.dim() == 4 and not reference.is_contiguous()
                             and reference.is_contiguous(memory_format=torch.channels_last))
            memory_format = torch.channels_last if channels_last else torch.preserve_format
            if (tensor.device != reference.device or tensor.dtype != reference.dtype
                    or (channels_last and not tensor.is_contiguous(memory_format=torch.channels_last))):
                tensor.data = tensor.data.to(device=reference.device, dtype=reference.dtype,
                                             memory_format=memory_format)


def _embed_on_the_fly(run: TrainerRun, captions, device) -> torch.Tensor:
    from openclip_align.data.semantic import embed_captions, load_sentence_encoder

    model_name = run.args.semantic_model
    encoder = load_sentence_encoder(model_name, device=str(device))
    # sentence-transformers returns numpy: it has synchronised already, so the check on the host is free
    vectors = embed_captions(encoder, list(captions), progress=False)
    if not np.isfinite(vectors).all():
        raise ValueError(f"--semantic-model {model_name} produced non-finite caption embeddings")
    width = run.semantic_width
    if width is not None and vectors.shape[1] != width:      # auto: precomputed and on-the-fly batches mix
        raise MissingExtrasError(
            f"--semantic-source auto: a batch without precomputed embeddings is embedded by --semantic-model "
            f"{model_name} at width {vectors.shape[1]}, but the precomputed ones have width {width}; pass the "
            "--semantic-model that made them, or precompute every shard's column with `openclip-align embed`")
    if (model_name, width) not in _ENCODERS_LOGGED:
        _ENCODERS_LOGGED.add((model_name, width))
        logging.info("openclip-align: --semantic-source auto: embedding a batch on the fly with %s (some of its "
                     "samples have no precomputed embedding)", model_name)
    return torch.from_numpy(vectors).to(device, non_blocking=True)


_ENCODERS_LOGGED: set = set()


# --- unnormalised features for losses that want them ---------------------------------------------
def _raw_feature_forward(model: nn.Module, upstream_forward):
    """In training mode return unnormalised features; evaluation keeps upstream's normalised ones."""

    def forward(image=None, text=None, *args, **kwargs):
        if not model.training:
            return upstream_forward(image, text, *args, **kwargs)
        out = {
            "image_features": model.encode_image(image, normalize=False) if image is not None else None,
            "text_features": model.encode_text(text, normalize=False) if text is not None else None,
            "logit_scale": model.logit_scale.exp(),
        }
        if getattr(model, "logit_bias", None) is not None:
            out["logit_bias"] = model.logit_bias
        return out

    return forward


# --- raw (unnormalised) feature statistics of the evaluation pass -------------------------------------
class RawFeatureTally:
    """Count, sum of norms and sum of the raw features that evaluation's forward passes produce.

    Upstream's evaluation only sees L2-normalised features; the mean raw norms (HyCD's effective inverse
    temperature is their product) and the gap on raw features (CLIP-Refine's training-log convention)
    need the unnormalised ones. Sums stay on the device and are read once, when the metrics are made.
    """

    def __init__(self):
        self.sums: Dict[str, list] = {}

    def add(self, modality: str, raw: torch.Tensor) -> None:
        raw = raw.detach().float()
        count, norms, total = self.sums.get(modality, (0, 0.0, 0.0))
        self.sums[modality] = (count + raw.shape[0], norms + raw.norm(dim=-1).sum(), total + raw.sum(dim=0))

    def pop_stats(self, n_pairs: int) -> Dict[str, float]:
        """``mean_norm_image``, ``mean_norm_text``, ``centroid_gap_sq_per_dim_raw``; empty unless both
        modalities saw exactly ``n_pairs`` rows (another forward path, or a partial pass)."""
        sums, self.sums = self.sums, {}
        if set(sums) != {"image", "text"} or any(sums[m][0] != n_pairs for m in sums):
            return {}
        from openclip_align.metrics.gap import norm_stats_from_sums

        (n, norm_x, sum_x), (_, norm_y, sum_y) = sums["image"], sums["text"]
        return norm_stats_from_sums(n, float(norm_x), float(norm_y), sum_x.double().cpu().numpy(),
                                    sum_y.double().cpu().numpy())


def _tallying_eval_forward(model: nn.Module, upstream_forward, tally: RawFeatureTally):
    """In evaluation, let the forward's own encode_image/encode_text calls also record raw statistics;
    training is untouched. The features returned are exactly upstream's."""
    encoders = {"image": model.encode_image, "text": model.encode_text}

    def tallying(modality):
        def encode(x, normalize: bool = False):
            raw = encoders[modality](x, normalize=False)
            tally.add(modality, raw)
            return F.normalize(raw, dim=-1) if normalize else raw
        return encode

    def forward(*args, **kwargs):
        if model.training:
            return upstream_forward(*args, **kwargs)
        own = {name: model.__dict__.get(name) for name in ("encode_image", "encode_text")}
        model.encode_image, model.encode_text = tallying("image"), tallying("text")
        try:
            return upstream_forward(*args, **kwargs)
        finally:
            for name, previous in own.items():
                if previous is None:
                    del model.__dict__[name]
                else:
                    setattr(model, name, previous)

    return forward


# --- the epoch loop: first-call setup, checkpoint record, resume -----------------------------------
def wrap_train_one_epoch(upstream):
    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        run = run_state.RUN
        if run is not None and not run._attached:
            _attach(run, model, data, optimizer, args)
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
        check_after_epoch(model, loss, epoch)   # every rank, before evaluation and the checkpoint
        return result

    train_one_epoch.__wrapped__ = upstream
    return train_one_epoch


def check_after_epoch(model, loss, epoch: int) -> None:
    """Finite loss and finite weights, checked by every rank and agreed on (rank_agreement) before upstream
    evaluates and rank 0 saves: a rank that would refuse to go on never leaves the others waiting."""
    if run_state.RUN is None:
        return
    problems = [loss.problem()] if isinstance(loss, TrainerLossAdapter) else []
    bad = checkpoints.non_finite_tensors(_unwrap(model).state_dict())
    if bad:
        problems.append(checkpoints.diverged_weights(bad, epoch + 1))
    rank_agreement.agree("; ".join(p for p in problems if p) or None, FloatingPointError)


def _attach(run: TrainerRun, model, data, optimizer, args) -> None:
    run._attached = True
    STASH.reset(args.accum_freq)
    if run.spec is not None:
        if run.uses_stash and not isinstance(data["train"].dataloader, ExtrasLoader):
            raise MissingExtrasError("the training dataloader was not built by open_clip_train's get_data, so "
                                     f"--loss {args.loss} cannot receive its per-pair extras")
        if run.spec.raw_features:
            inner = _unwrap(model)
            if not hasattr(inner, "encode_image"):
                raise TypeError(f"--loss {args.loss} needs a model with encode_image/encode_text")
            inner.forward = _raw_feature_forward(inner, inner.forward)
        parameter = next(_unwrap(model).parameters(), None)
        if run.loss_module is not None and parameter is not None:
            run.loss_module.place(parameter.device)          # before step 1 and before a resumed state loads
        if run.needs_teacher:
            prepare_teacher(run, _unwrap(model), None)
            # the teacher runs on the student's own device inputs (no second host-to-device copy); the hook
            # sits on the outermost module, so it runs eagerly also when the student is compiled
            model.register_forward_pre_hook(_record_model_inputs)
    inner = _unwrap(model)
    if args.gap_metrics and hasattr(inner, "encode_image") and hasattr(inner, "encode_text"):
        inner.forward = _tallying_eval_forward(inner, inner.forward, run.raw_tally)
    if optimizer is not None:
        optimizer.register_state_dict_post_hook(lambda opt, state: _record_in_checkpoint(run, state))
    if args.resume:
        _restore_from_checkpoint(run, args.resume)


def _record_model_inputs(module, inputs) -> None:
    if module.training and len(inputs) >= 2:
        STASH.record_model_inputs(inputs[0], inputs[1])


def _record_in_checkpoint(run: TrainerRun, optimizer_state: dict) -> dict:
    if run.loss_module is not None:
        run.loss_module.check_finite(shared=False)   # rank 0 only: check_after_epoch had every rank agree
    args = run.args
    record = {"loss": args.loss, "options": {k: getattr(args, k, None) for k in loss_option_names(args.loss)}}
    if run.spec is not None and run.spec.stateful and run.loss_module is not None:
        record["state"] = {k: v.detach().cpu() for k, v in run.loss_module.loss.state_dict().items()}
    if run.teacher_sha256:
        record["teacher_sha256"] = run.teacher_sha256
    optimizer_state[CHECKPOINT_KEY] = record
    return optimizer_state


def _restore_from_checkpoint(run: TrainerRun, path: str) -> None:
    """The plugin's part of a resume, from the record upstream's own resume load found (the file is read
    once per rank: see checkpoints.load_once); read here only when that load did not happen."""
    record = checkpoints.take_resumed_record(path)
    if record is checkpoints.NOT_LOADED:
        from open_clip_train.file_utils import pt_load

        checkpoints.load_once(getattr(pt_load, "__wrapped__", pt_load), path, map_location="cpu")
        record = checkpoints.take_resumed_record(path)
    loss = run.args.loss
    if record is None:
        if run.spec is not None and (run.spec.stateful or run.needs_teacher):
            raise RuntimeError(f"--resume {path}: the checkpoint has no openclip-align record, so the state of "
                               f"--loss {loss} cannot be restored; start a new run instead of resuming")
        return
    if record.get("loss") != loss:
        logging.warning("openclip-align: resuming with --loss %s from a checkpoint trained with --loss %s",
                        loss, record.get("loss"))
        if run.spec is not None and run.spec.stateful:
            raise RuntimeError(f"--resume {path}: checkpoint was trained with --loss {record.get('loss')}, "
                               f"not {loss}; the per-sample state of {loss} cannot be restored")
    if run.spec is not None and run.spec.stateful:
        if "state" not in record:
            raise RuntimeError(f"--resume {path}: the checkpoint's openclip-align record has no state for --loss "
                               f"{loss} (written by an older openclip-align); start a new run instead of resuming")
        # adopt the loaded tensors (memory-mapped from the file) instead of copying them into the fresh
        # state, then move them to the training device: no second full host copy of a large state
        run.loss_module.loss.load_state_dict(record["state"], assign=True)
        if run.loss_module._device is not None:
            run.loss_module.place(run.loss_module._device)
        logging.info("openclip-align: restored --loss %s state from %s", loss, path)
    if run.needs_teacher and record.get("teacher_sha256") and record["teacher_sha256"] != run.teacher_sha256:
        raise RuntimeError(
            f"--resume {path}: the teacher (the model before refinement) differs from the one this run "
            "started from; pass the same --model/--pretrained as the original run")


# --- evaluation: modality-gap metrics next to the retrieval metrics --------------------------------
def wrap_get_clip_metrics(upstream):
    def get_clip_metrics(image_features, text_features, logit_scale):
        metrics = upstream(image_features, text_features, logit_scale)
        run = run_state.RUN
        if run is not None and run.args.gap_metrics and len(image_features) >= 2:
            try:
                from openclip_align.metrics import modality_gap_report

                report = modality_gap_report(image_features, text_features, seed=0,
                                             max_pairs=run.args.gap_max_pairs)
            except Exception:  # evaluation runs before the epoch's checkpoint is saved: never lose it
                logging.exception("openclip-align: modality-gap metrics failed; continuing without them")
                return metrics
            report.update(run.raw_tally.pop_stats(len(image_features)))
            for key, value in report.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    metrics[f"gap/{key}"] = float(value)
        return metrics

    get_clip_metrics.__wrapped__ = upstream
    return get_clip_metrics
