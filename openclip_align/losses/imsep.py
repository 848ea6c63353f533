"""AlignCLIP's IMSep loss: the CLIP loss plus semantically regularised intra-modality separation terms.

Eslami & de Melo, "Mitigate the Gap: Investigating Approaches for Improving Cross-Modal Alignment in CLIP",
ICLR 2025 (arXiv 2406.17639); defaults follow the authors' released training script.

Formula (x_i, y_i: L2-normalised image / caption embeddings of pair i; t: the exponentiated logit scale)::

    C_ij = x_i . y_j          V_ij = x_i . x_j          U_ij = y_i . y_j
    S_ij = cos(e_i, e_j)      e_i: sentence-transformer embedding of caption i (no gradient)
    D_ij = 1 - S_ij           semantic distance of the two captions
    V'_ij = V_ij * D_ij for j != i,   V'_ii = C_ii        (U' from U the same way)
    IMSep_img = CE(t V')      IMSep_txt = CE(t U')       CE(M) = mean_i [ -log softmax(M_i)_i ]
    loss  = (CE(t C) + CE(t C^T)) / 2  +  w * IMSep_img  +  w * IMSep_txt

with ``w = --imsep-weight`` (default 0.25) and the text term on unless ``--no-imsep-text``.

What each setting reproduces:

* defaults (``w = 0.25``, text term on): the authors' script, ``CE(tC) + CE(tC^T) + 0.5 (IMSep_img +
  IMSep_txt)`` (``--alpha 1 --beta 0.5 --separate_image --separate_text``). Its CLIP term is the SUM of the
  two directions; divided by 2 to put it on OpenCLIP's ClipLoss scale (the mean) this is exactly the loss
  above. The overall factor 2 does not change AdamW's updates (Adam is invariant to a constant loss scale,
  up to eps).
* ``--no-imsep-text``: image side only, as the paper's text describes the method.
* ``--imsep-weight 0.5 --no-imsep-text``: this project's earlier default (twice the authors' relative
  weight on the image side, no text side), kept for comparison with older runs.

So an image is pushed away from the other images (and a caption from the other captions) in proportion
to how different their captions are, while the paired image-caption cosine stays the positive.

Terms are reported as ``contrastive_loss``, ``imsep_loss`` (image side) and ``imsep_text_loss``.

Across ranks (see :mod:`openclip_align.losses.distributed`): x, y and the semantic embeddings are gathered
in rank order. ``local_loss=False``: every rank computes the loss over the whole gathered batch.
``local_loss=True``: rows (anchors) are the rank's own pairs, columns the gathered batch, targets offset by
``rank * B``; the loss is the mean over the local rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import AlignLoss, as_scale, check_pair, check_rows, contrastive, targets
from .distributed import DistributedConfig, compute_dtype
from .options import Option
from .registry import NEEDS_SEMANTIC, register_loss

# Weight of each IMSep term relative to OpenCLIP's ClipLoss: the authors' beta 0.5 against their summed
# (not averaged) CLIP term.
DEFAULT_WEIGHT = 0.25
SEMANTIC_HINT = ("precompute them with `openclip-align embed` or let the trainer embed captions on the fly "
                 "(--semantic-source)")


def separation_term(anchor_rows, anchor_all, paired_diag, distance, scale, offset: int) -> torch.Tensor:
    """CE(t M') where M = anchor_rows @ anchor_all^T scaled by ``distance`` off the positive and the
    positive entry (row i, column offset + i) replaced by ``paired_diag[i]`` (= C_ii)."""
    rows = anchor_rows.shape[0]
    labels = targets(rows, offset, anchor_rows.device)
    sims = anchor_rows @ anchor_all.T
    positive = F.one_hot(labels, num_classes=anchor_all.shape[0]).bool()
    logits = torch.where(positive, paired_diag[:, None], sims * distance)
    return F.cross_entropy(scale * logits, labels)


@register_loss("imsep", needs={NEEDS_SEMANTIC})
class IMSepLoss(AlignLoss):
    """AlignCLIP: CLIP loss + --imsep-weight x (IMSep_img + IMSep_txt), image-image and caption-caption
    separation terms scaled by the semantic distance of the captions; defaults = the authors' released script
    (needs sentence embeddings of the captions)"""
    options = {
        "weight": "weight of each IMSep term relative to OpenCLIP's CLIP loss (the mean of its two directions); "
                  "0.25 with the text term = the authors' script (CE(tC) + CE(tC^T) + 0.5 (IMSep_img + IMSep_txt)); "
                  "0.5 with --no-imsep-text = this project's pre-2026-11-24 default",
        "text_term": Option("the text-side term (caption-caption logits rescaled the same way), as the authors' "
                            "script runs it; --no-imsep-text keeps the image side only, as the paper's text "
                            "describes the method", flag="--imsep-text"),
    }

    def __init__(self, weight: float = DEFAULT_WEIGHT, text_term: bool = True, dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        self.weight = float(weight)
        self.text_term = bool(text_term)

    def forward(self, image_features, text_features, logit_scale, semantic_features=None, output_dict=False,
                **kwargs):
        batch = check_pair(self.loss_name, image_features, text_features)
        semantic_features = check_rows(self.loss_name, "semantic_features (sentence embeddings of the captions)",
                                       semantic_features, batch, SEMANTIC_HINT)
        semantic_features = semantic_features.to(device=image_features.device, non_blocking=True)
        d = self.dist
        x_all, y_all = d.gather(image_features, text_features)
        (e_all,) = d.gather_no_grad(semantic_features)
        x, y = d.anchors(image_features, x_all), d.anchors(text_features, y_all)
        e = d.anchors(semantic_features, e_all)
        offset = d.row_offset(batch)
        scale = as_scale(logit_scale, x.dtype, x.device)

        with torch.no_grad():
            dtype = compute_dtype(x)
            e_unit = F.normalize(e.to(dtype), dim=-1)
            e_all_unit = F.normalize(e_all.to(dtype), dim=-1)
            distance = (1.0 - e_unit @ e_all_unit.T).to(x.dtype)
        paired = (x * y).sum(dim=-1)                          # C_ii
        terms = {
            "contrastive_loss": contrastive(x, y, x_all, y_all, scale, offset),
            "imsep_loss": self.weight * separation_term(x, x_all, paired, distance, scale, offset),
        }
        if self.text_term:
            terms["imsep_text_loss"] = self.weight * separation_term(y, y_all, paired, distance, scale, offset)
        return self._finish(terms, output_dict)
