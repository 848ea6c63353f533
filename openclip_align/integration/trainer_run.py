"""What the plugin does inside one ``open_clip_train.main`` run, step by step.

Upstream's ``main`` calls, in order: ``parse_args`` -> ``create_model_and_transforms`` -> (resume)
-> ``get_data`` -> ``create_loss`` -> ``train_one_epoch`` / ``evaluate`` -> ``torch.save``. The
wrappers below hook into those calls; :class:`TrainerRun` holds what they share. With
``--loss clip`` they only record the loss name; upstream's computation is untouched.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from openclip_align.losses.registry import NEEDS_INDEX, NEEDS_SEMANTIC, get_loss_spec

from . import batch_extras
from .batch_extras import CAPTION, INDEX, SEMANTIC, STASH, ExtrasLoader, MissingExtrasError
from .trainer_args import loss_option_names

CHECKPOINT_KEY = "openclip_align"     # stored inside checkpoint["optimizer"] (see docs/how-it-hooks-in.md)


class TrainerRun:
    """State of the current trainer run (one per process; None outside ``open_clip_train``)."""

    def __init__(self, args):
        self.args = args
        self.spec = None if args.loss == "clip" else get_loss_spec(args.loss)
        self.teacher: Optional[nn.Module] = None
        self.teacher_sha256: Optional[str] = None
        self.num_train_samples: Optional[int] = None
        self.loss_module = None
        self.raw_tally = RawFeatureTally()
        self._attached = False

    @property
    def needs(self):
        return set() if self.spec is None else set(self.spec.needs)

    @property
    def needs_teacher(self) -> bool:
        return self.spec is not None and "teacher_image_features" in inspect.signature(self.spec.cls.forward).parameters

    @property
    def uses_stash(self) -> bool:
        """Whether the loss reads the batch stash (extras, or raw inputs for the teacher)."""
        return bool(self.data_extras()) or self.needs_teacher

    def data_extras(self):
        """Extras the training batches must carry for this loss."""
        extras = set(self.needs)
        if NEEDS_SEMANTIC in extras:
            extras.add(CAPTION)
        return extras


RUN: Optional[TrainerRun] = None


def start_run(args) -> TrainerRun:
    global RUN
    RUN = TrainerRun(args)
    return RUN


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)             # DDP
    return getattr(model, "_orig_mod", model)           # torch.compile


# --- model creation: snapshot the teacher ------------------------------------------------------
def wrap_create_model_and_transforms(upstream):
    def create_model_and_transforms(*args, **kwargs):
        result = upstream(*args, **kwargs)
        run = RUN
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
        run = RUN
        if run is None or not run.uses_stash or not args.train_data:
            if run is not None and run.uses_stash and args.dataset_type == "synthetic":
                raise MissingExtrasError(f"--loss {args.loss} needs captions/indices; synthetic data has none")
            return upstream_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        source = args.semantic_source
        options = dict(csv_index_key=args.csv_index_key, csv_embeddings=args.semantic_embeddings,
                       semantic_precomputed=source != "on-the-fly", semantic_on_the_fly=source != "precomputed")
        dataset_fn = data_module.get_dataset_fn(args.train_data, args.dataset_type)
        if dataset_fn is data_module.get_wds_dataset:
            batch_extras.check_webdataset_extras(args.train_data, run.needs, options["semantic_on_the_fly"])
        with batch_extras.requesting(run.data_extras(), **options):
            train = dataset_fn(args, preprocess_fns[0], is_train=True, epoch=epoch, tokenizer=tokenizer)
        train.dataloader = ExtrasLoader(train.dataloader)
        run.num_train_samples = _dataset_size(args, train, data_module)
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
    try:
        total, _ = data_module.get_dataset_size(args.train_data)   # webdataset: sizes.json / __len__
        return total
    except Exception:  # no size file: a loss that needs the size says so when it is built
        return None


# --- the loss ------------------------------------------------------------------------------------
def wrap_create_loss(upstream_create_loss):
    def create_loss(args):
        run = RUN
        if run is None or run.spec is None:
            return upstream_create_loss(args)
        loss = run.spec.cls.from_args(args, num_samples=run.num_train_samples)
        run.loss_module = TrainerLossAdapter(run, loss)
        logging.info("openclip-align: --loss %s (%s)", run.spec.name, type(loss).__name__)
        return run.loss_module

    create_loss.__wrapped__ = upstream_create_loss
    return create_loss


class TrainerLossAdapter(nn.Module):
    """Calls a registry loss the way upstream's trainer calls ClipLoss, adding what it needs.

    Pulls the batch's extras from the stash (semantic embeddings, indices), embeds captions on
    the fly when asked to, runs the frozen teacher, and refuses a non-finite loss with a clear error
    at the next step or the end of the epoch, before any checkpoint is written from a diverged model.
    """

    def __init__(self, run: TrainerRun, loss: nn.Module):
        super().__init__()
        self.run = run
        self.loss = loss
        self._cache_key = None
        self._cache: Dict[str, torch.Tensor] = {}

    def _per_step_inputs(self, batch, device, dtype) -> Dict[str, torch.Tensor]:
        # the loss runs accum_freq times per step on the same batches: compute these once
        key = batch["generation"]
        if key == self._cache_key:
            return self._cache
        run, out = self.run, {}
        if NEEDS_SEMANTIC in run.needs:
            if SEMANTIC in batch:
                out["semantic_features"] = batch[SEMANTIC].to(device=device, dtype=torch.float32)
            elif run.args.semantic_source != "precomputed" and CAPTION in batch:
                out["semantic_features"] = _embed_on_the_fly(run.args.semantic_model, batch[CAPTION], device)
            else:
                raise MissingExtrasError(
                    f"--loss {run.args.loss}: this batch has no semantic embeddings (and no raw captions to "
                    "embed on the fly); see `openclip-align embed`")
        if NEEDS_INDEX in run.needs:
            if INDEX not in batch:
                raise MissingExtrasError(f"--loss {run.args.loss} needs a per-pair dataset index; the batch has none")
            out["index"] = batch[INDEX].to(device)
        if run.needs_teacher:
            teacher = run.teacher.to(device)
            with torch.no_grad():
                images = batch["images"].to(device=device, dtype=dtype)
                texts = batch["texts"].to(device)
                out["teacher_image_features"] = teacher.encode_image(images, normalize=not run.spec.raw_features)
                out["teacher_text_features"] = teacher.encode_text(texts, normalize=not run.spec.raw_features)
        self._cache_key, self._cache = key, out
        return out

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        run = self.run
        device = image_features.device
        self.loss.to(device)
        inputs = {}
        if run.needs or run.needs_teacher:
            batch = STASH.take(image_features.shape[0])
            inputs = self._per_step_inputs(batch, device, image_features.dtype)
        self.check_finite()
        terms = self.loss(image_features, text_features, logit_scale, output_dict=True, **inputs, **kwargs)
        total = sum(terms.values())
        # checked at the next call (or the end of the epoch), so the GPU is not synchronised every step
        self._pending = (torch.isfinite(total.detach()).all(), {k: v.detach() for k, v in terms.items()})
        return terms if output_dict else total

    def check_finite(self) -> None:
        """Raise if the previous loss value was NaN/inf, before another step or a checkpoint is made."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None and not bool(pending[0]):
            values = {k: float(v) for k, v in pending[1].items()}
            raise FloatingPointError(
                f"--loss {self.run.args.loss} became non-finite ({values}); stopping before the next step and "
                "before any checkpoint of this epoch, so the checkpoints already written stay intact. Try a "
                "lower --lr or --precision fp32.")


_ENCODERS: Dict[tuple, object] = {}


def _embed_on_the_fly(model_name: str, captions, device) -> torch.Tensor:
    from openclip_align.data.semantic import embed_captions, load_sentence_encoder

    encoder = load_sentence_encoder(model_name, device=str(device))
    vectors = embed_captions(encoder, list(captions), progress=False)
    return torch.as_tensor(vectors, dtype=torch.float32, device=device)


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
        (n, norm_x, sum_x), (_, norm_y, sum_y) = sums["image"], sums["text"]
        delta = (sum_x.double() - sum_y.double()) / n
        return {"mean_norm_image": float(norm_x) / n, "mean_norm_text": float(norm_y) / n,
                "centroid_gap_sq_per_dim_raw": float(delta @ delta) / delta.numel()}


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
        run = RUN
        if run is not None and not run._attached:
            _attach(run, model, data, optimizer, args)
        result = upstream(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer)
        if isinstance(loss, TrainerLossAdapter):
            loss.check_finite()           # the epoch's last step, before evaluation and the checkpoint
        return result

    train_one_epoch.__wrapped__ = upstream
    return train_one_epoch


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
    inner = _unwrap(model)
    if args.gap_metrics and hasattr(inner, "encode_image") and hasattr(inner, "encode_text"):
        inner.forward = _tallying_eval_forward(inner, inner.forward, run.raw_tally)
    if optimizer is not None:
        optimizer.register_state_dict_post_hook(lambda opt, state: _record_in_checkpoint(run, state))
    if args.resume:
        _restore_from_checkpoint(run, args.resume)


def _record_in_checkpoint(run: TrainerRun, optimizer_state: dict) -> dict:
    args = run.args
    record = {"loss": args.loss, "options": {k: getattr(args, k, None) for k in loss_option_names(args.loss)}}
    if run.spec is not None and run.spec.stateful and run.loss_module is not None:
        record["state"] = {k: v.detach().cpu() for k, v in run.loss_module.loss.state_dict().items()}
    if run.teacher_sha256:
        record["teacher_sha256"] = run.teacher_sha256
    optimizer_state[CHECKPOINT_KEY] = record
    return optimizer_state


def _restore_from_checkpoint(run: TrainerRun, path: str) -> None:
    from open_clip_train.file_utils import pt_load

    checkpoint = pt_load(path, map_location="cpu")
    record = checkpoint.get("optimizer", {}).get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
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
        run.loss_module.loss.load_state_dict(record["state"])
        logging.info("openclip-align: restored --loss %s state from %s", loss, path)
    if run.needs_teacher and record.get("teacher_sha256") and record["teacher_sha256"] != run.teacher_sha256:
        raise RuntimeError(
            f"--resume {path}: the teacher (the model before refinement) differs from the one this run "
            "started from; pass the same --model/--pretrained as the original run")


# --- evaluation: modality-gap metrics next to the retrieval metrics --------------------------------
def wrap_get_clip_metrics(upstream):
    def get_clip_metrics(image_features, text_features, logit_scale):
        metrics = upstream(image_features, text_features, logit_scale)
        run = RUN
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
