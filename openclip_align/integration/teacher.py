"""The frozen teacher of a distillation loss (CLIP-Refine): its snapshot, its fingerprint, how it runs.

The model as created (pretrained weights, before any resume or update) is the teacher. It is copied once,
its SHA-256 is kept for the checkpoint record (a resume checks it), and before step 1 it is put on the
student's device with the student's dtypes and memory format, compiled when the student is.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import logging
from typing import Optional

import torch
from torch import nn

from .run_state import TrainerRun


def snapshot_teacher(run: TrainerRun, model: nn.Module) -> None:
    """Keep a frozen copy of ``model`` (the first model the run creates) as the run's teacher."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    run.teacher = teacher
    run.teacher_sha256 = state_fingerprint(teacher)
    logging.info("openclip-align: frozen teacher for --loss %s taken from the starting model (sha256 %s)",
                 run.args.loss, run.teacher_sha256[:12])


def state_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TeacherEncoder(nn.Module):
    """The frozen teacher's image and text features in one call (one module to hand to ``torch.compile``)."""

    def __init__(self, teacher: nn.Module, normalize: bool):
        super().__init__()
        self.teacher = teacher
        self.normalize = normalize

    def forward(self, images, texts):
        return (self.teacher.encode_image(images, normalize=self.normalize),
                self.teacher.encode_text(texts, normalize=self.normalize))


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


def input_recorder(stash):
    """A forward pre-hook for the student that keeps its inputs in ``stash``: the teacher runs on the
    student's own device inputs (no second host-to-device copy of the batch)."""
    def record_model_inputs(module, inputs) -> None:
        if module.training and len(inputs) >= 2:
            stash.record_model_inputs(inputs[0], inputs[1])

    return record_model_inputs


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
