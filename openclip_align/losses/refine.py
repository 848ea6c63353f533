"""CLIP-Refine: post-pre-training of a pretrained CLIP with HyCD + RaFA (no CLIP term).

Yamaguchi et al., "Post-pre-training for Modality Alignment in Vision-Language Foundation Models", CVPR 2025.

Features are the raw (unnormalised) projections; logits carry no temperature. With f, g the student's
image / caption features, F, G the frozen teacher's (the model before refinement), B pairs, d dims::

    Q_img = softmax_rows(f g^T)           Q_txt = softmax_rows(g f^T)            (student)
    P_img = a I + (1 - a) softmax_rows(F G^T)
    P_txt = a I + (1 - a) softmax_rows(G F^T)                                   (hybrid target, a = --hycd-alpha)
    HyCD  = [ H(P_img, Q_img) + H(P_txt, Q_txt) ] / 2,
            H(P, Q) = -mean_i sum_j P_ij log Q_ij  = KL(P || Q) + H(P)
    RaFA  = mean_{i,k} (f_ik - z_ik)^2 + mean_{i,k} (g_ik - z_ik)^2,
            z_i ~ N(0, s^2 I) drawn afresh every step, one row per pair shared by image and caption
            (s = --rafa-scale)
    loss  = HyCD + w * RaFA                                               (w = --rafa-weight)

With a = 1, HyCD is the symmetric InfoNCE loss on unscaled logits. ``--hycd-logit-scale S`` is a variant,
not the authors' loss: every logit above becomes S x cos (f_i, g_j) (teacher likewise), so HyCD runs at
temperature 1/S instead of the effective 1 / (|f| |g|) of raw features. The paper writes the loss as
KL(P || Q) (docs/methods.md); we report the soft-target cross-entropy, which differs by the target's entropy H(P), a constant
for the student: gradients are identical, and the value is easy to check by hand (with a = 0 and
student == teacher the value is the teacher distribution's entropy, the KL part being zero).

Across ranks: student and teacher features are gathered in rank order (teacher without gradient).
``local_loss=False``: every rank computes both terms over the gathered batch. ``local_loss=True``: anchor
rows are the rank's own pairs against gathered columns (targets at ``rank * B + i``); RaFA over its own rows.
The reference Z is drawn for the whole global batch from a generator seeded identically on every rank, so
pair ``k`` of the global batch gets the same reference whichever rank holds it, and a single process on the
concatenated batch draws the same Z. The k-th Z comes from a generator seeded with (seed, k); the draw count
is loss state, saved in checkpoints, so a resumed run continues the sequence. With ``--accum-freq N`` the trainer calls the loss N times per
optimizer step on the same batch: Z is redrawn every N calls.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import AlignLoss, check_pair, check_rows, targets
from .distributed import DistributedConfig, compute_dtype, touch
from .options import Option, constructor_kwargs
from .registry import register_loss

TEACHER_HINT = ("the trainer passes the frozen teacher's (the starting model's) embeddings as "
                "teacher_image_features / teacher_text_features")


def hycd_direction(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                   labels: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy H(P, softmax(student)) averaged over rows, with
    P = alpha * onehot(labels) + (1 - alpha) * softmax(teacher). It equals KL(P || Q) + H(P); H(P) does
    not depend on the student, so the gradient is the KL's."""
    with torch.no_grad():
        onehot = F.one_hot(labels, num_classes=teacher_logits.shape[1]).to(teacher_logits.dtype)
        target = alpha * onehot + (1.0 - alpha) * teacher_logits.softmax(dim=-1)
    return -(target * student_logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def hycd_terms(f, g, f_all, g_all, tf, tg, tf_all, tg_all, alpha: float, offset: int,
               logit_scale: Optional[float] = None) -> torch.Tensor:
    """Both HyCD directions. ``logit_scale`` None: logits are raw-feature dot products (the authors'); a
    number s: logits are s times cosine similarities, for student and teacher alike."""
    if logit_scale is not None:
        f, g, f_all, g_all, tf, tg, tf_all, tg_all = (
            F.normalize(t, dim=-1) for t in (f, g, f_all, g_all, tf, tg, tf_all, tg_all))
    scale = 1.0 if logit_scale is None else float(logit_scale)
    labels = targets(f.shape[0], offset, f.device)
    image_to_text = hycd_direction(scale * f @ g_all.T, scale * tf @ tg_all.T, alpha, labels)
    text_to_image = hycd_direction(scale * g @ f_all.T, scale * tg @ tf_all.T, alpha, labels)
    return (image_to_text + text_to_image) / 2


class HyCDLoss(AlignLoss):
    """Hybrid contrastive distillation (the HyCD term of CLIP-Refine) on raw features, no temperature; with
    ``logit_scale`` s, on s x cosine similarities instead (a variant: HyCD at the temperature 1/s)."""

    loss_name = "refine"

    def __init__(self, alpha: float = 0.5, dist: Optional[DistributedConfig] = None,
                 logit_scale: Optional[float] = None):
        super().__init__(dist)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--hycd-alpha must lie in [0, 1], got {alpha}")
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"--hycd-logit-scale must be positive, got {logit_scale}")
        self.alpha = float(alpha)
        self.logit_scale = None if logit_scale is None else float(logit_scale)

    def forward(self, image_features, text_features, teacher_image_features=None, teacher_text_features=None,
                **kwargs) -> torch.Tensor:
        batch = check_pair(self.loss_name, image_features, text_features)
        f_all, g_all = self.dist.gather(image_features, text_features)
        return self._from_gathered(image_features, text_features, f_all, g_all,
                                   teacher_image_features, teacher_text_features, batch)

    def _from_gathered(self, f_local, g_local, f_all, g_all, teacher_image_features, teacher_text_features,
                       batch: int) -> torch.Tensor:
        tf, tg = _check_teacher(self.loss_name, batch, teacher_image_features, teacher_text_features)
        d, dtype = self.dist, compute_dtype(f_local)
        tf_all, tg_all = d.gather_no_grad(tf.to(f_local.device, non_blocking=True),
                                          tg.to(f_local.device, non_blocking=True))
        f, g = d.anchors(f_local, f_all), d.anchors(g_local, g_all)
        tf_rows, tg_rows = d.anchors(tf, tf_all), d.anchors(tg, tg_all)
        return hycd_terms(*(t.to(device=f.device, dtype=dtype)
                            for t in (f, g, f_all, g_all, tf_rows, tg_rows, tf_all, tg_all)),
                          alpha=self.alpha, offset=d.row_offset(batch), logit_scale=self.logit_scale)


class RaFALoss(AlignLoss):
    """Random feature alignment: MSE of raw image and caption features to a shared Gaussian reference."""

    loss_name = "refine"

    def __init__(self, scale: float = 1.0, seed: int = 0, accum_freq: int = 1,
                 dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        if not scale > 0:
            raise ValueError(f"--rafa-scale (std of the Gaussian prior) must be positive, got {scale}")
        self.scale = float(scale)
        self.accum_freq = max(1, int(accum_freq))
        self.seed = int(seed)
        # draws made so far: the k-th reference comes from a generator seeded with (seed, k), so the count
        # (saved in checkpoints as loss state) is all a resumed run needs to continue the same sequence
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        # host copy of `draws`, so that no step reads the buffer back from the device; a loaded state sets
        # it from the incoming (checkpoint, hence CPU) tensor, once, before any step
        self._draw_count = 0
        self.register_load_state_dict_pre_hook(_read_draw_count)
        self._calls = 0
        self._reference: Optional[torch.Tensor] = None

    def reference(self, global_batch: int, dim: int) -> torch.Tensor:
        """Z for the whole global batch (CPU, float32); a new draw every ``accum_freq`` calls."""
        fresh = self._calls % self.accum_freq == 0 or self._reference is None \
            or self._reference.shape != (global_batch, dim)
        if fresh:
            generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self._draw_count)
            self._reference = torch.randn(global_batch, dim, generator=generator) * self.scale
            self._draw_count += 1
            self.draws.fill_(self._draw_count)
        self._calls += 1
        return self._reference

    def forward(self, image_features, text_features, **kwargs) -> torch.Tensor:
        batch = check_pair(self.loss_name, image_features, text_features)
        f_all, g_all = self.dist.gather(image_features, text_features)
        return self._from_gathered(image_features, text_features, f_all, g_all, batch)

    def _from_gathered(self, f_local, g_local, f_all, g_all, batch: int) -> torch.Tensor:
        d, dtype = self.dist, compute_dtype(f_local)
        f, g = d.anchors(f_local, f_all), d.anchors(g_local, g_all)
        z = self.reference(f_all.shape[0], f_all.shape[1])
        offset = d.row_offset(batch)
        z = z[offset:offset + f.shape[0]].to(device=f.device, dtype=dtype, non_blocking=True)
        return F.mse_loss(f.to(dtype), z) + F.mse_loss(g.to(dtype), z)


def _read_draw_count(module, state_dict, prefix, *args) -> None:
    draws = state_dict.get(prefix + "draws")
    if draws is not None:
        module._draw_count = int(draws)


def _check_teacher(name, batch, teacher_image_features, teacher_text_features):
    tf = check_rows(name, "teacher_image_features", teacher_image_features, batch, TEACHER_HINT)
    tg = check_rows(name, "teacher_text_features", teacher_text_features, batch, TEACHER_HINT)
    if tf.shape != tg.shape:
        raise ValueError(f"--loss {name}: teacher_image_features {tuple(tf.shape)} and teacher_text_features "
                         f"{tuple(tg.shape)} must have the same shape")
    return tf, tg


@register_loss("refine", raw_features=True, stateful=True)
class CLIPRefineLoss(AlignLoss):
    """CLIP-Refine post-pre-training: HyCD (distillation to a mix of identity and the frozen starting model's
    similarities) + --rafa-weight x RaFA (align raw features to a shared Gaussian reference)"""
    # flags named after the term they set (--hycd-*, --rafa-*), not --refine-*
    options = {
        "alpha": Option("HyCD: weight of the identity in the target distribution", flag="--hycd-alpha"),
        "rafa_weight": Option("weight of the RaFA term", flag="--rafa-weight"),
        "rafa_scale": Option("RaFA: standard deviation of the Gaussian reference", flag="--rafa-scale"),
        "hycd_logit_scale": Option("HyCD on S x cosine similarities (student and teacher) instead of the authors' "
                                   "unscaled raw-feature dot products, i.e. at temperature 1/S",
                                   flag="--hycd-logit-scale", metavar="S", default_text="the authors'"),
        "seed": Option("RaFA: seed of the reference generator, the same on every rank", flag="--rafa-seed",
                       default=None, default_text="--seed"),
    }

    def __init__(self, alpha: float = 0.5, rafa_weight: float = 1.0, rafa_scale: float = 1.0, seed: int = 0,
                 accum_freq: int = 1, dist: Optional[DistributedConfig] = None,
                 hycd_logit_scale: Optional[float] = None):
        super().__init__(dist)
        self.hycd = HyCDLoss(alpha, self.dist, logit_scale=hycd_logit_scale)
        self.rafa = RaFALoss(rafa_scale, seed, accum_freq, self.dist)
        self.rafa_weight = float(rafa_weight)

    @classmethod
    def from_args(cls, args, **context) -> "CLIPRefineLoss":
        """As every loss's, except that ``--rafa-seed`` left out (None) means the run's ``--seed``."""
        kwargs = constructor_kwargs(cls, args, context)
        if kwargs["seed"] is None:
            kwargs["seed"] = getattr(args, "seed", 0) or 0
        return cls(**kwargs)

    def forward(self, image_features, text_features, logit_scale, teacher_image_features=None,
                teacher_text_features=None, output_dict=False, **kwargs):
        batch = check_pair(self.loss_name, image_features, text_features)
        f_all, g_all = self.dist.gather(image_features, text_features)          # one gather for both terms
        hycd = self.hycd._from_gathered(image_features, text_features, f_all, g_all,
                                        teacher_image_features, teacher_text_features, batch)
        rafa = self.rafa._from_gathered(image_features, text_features, f_all, g_all, batch)
        terms = {"hycd_loss": touch(hycd, logit_scale), "rafa_loss": self.rafa_weight * rafa}
        return self._finish(terms, output_dict)
