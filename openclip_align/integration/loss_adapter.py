"""The loss as upstream's trainer calls it: a registry loss behind ClipLoss's call signature.

:class:`TrainerLossAdapter` adds what the loss needs besides the features (the batch's extras from the
stash, captions embedded on the fly, the frozen teacher's features) and :class:`NonFiniteWatch` records on
the device whether the loss was ever non-finite. :func:`raw_feature_forward` gives losses that want them
the unnormalised training features.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from openclip_align.data.errors import MissingExtrasError
from openclip_align.losses._common import inputs_validated
from openclip_align.losses.registry import NEEDS_INDEX, NEEDS_SEMANTIC

from . import rank_agreement
from .run_state import CAPTION, INDEX, SEMANTIC, TrainerRun
from .teacher import prepare_teacher


def build_loss(run: TrainerRun) -> "TrainerLossAdapter":
    """The run's ``--loss``, sized to the training set, behind the adapter (kept as ``run.loss_module``)."""
    loss = run.spec.cls.from_args(run.args, num_samples=run.num_train_samples)
    run.loss_module = TrainerLossAdapter(run, loss)
    logging.info("openclip-align: --loss %s (%s)", run.spec.name, type(loss).__name__)
    return run.loss_module


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
        self._logged_encoders: set = set()      # (model, width) of on-the-fly embedding already logged

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
                out["semantic_features"] = _embed_on_the_fly(run, batch[CAPTION], device, self._logged_encoders)
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
        if device != self._device:               # normally done before step 1 (see before_train.attach)
            self.place(device)
        inputs = {}
        if run.needs or run.needs_teacher:
            batch = run.stash.take(image_features.shape[0])
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
        """Whether this call ends a step that upstream's epoch loop logs (its own rule)."""
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


def _embed_on_the_fly(run: TrainerRun, captions, device, logged: set) -> torch.Tensor:
    """A batch's captions embedded by ``--semantic-model`` (the batch had no precomputed embeddings);
    ``logged``: the (model, width) pairs already announced in the log."""
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
    if (model_name, width) not in logged:
        logged.add((model_name, width))
        logging.info("openclip-align: --semantic-source auto: embedding a batch on the fly with %s (some of its "
                     "samples have no precomputed embedding)", model_name)
    return torch.from_numpy(vectors).to(device, non_blocking=True)




# --- unnormalised features for losses that want them ---------------------------------------------
def raw_feature_forward(model: nn.Module, upstream_forward):
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
