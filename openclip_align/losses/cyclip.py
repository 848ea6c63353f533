"""CyCLIP: the CLIP loss plus two cycle-consistency regularisers on raw cosine similarities.

Goel et al., "CyCLIP: Cyclic Contrastive Language-Image Pretraining", NeurIPS 2022.

With x_i, y_i the L2-normalised image / caption features of the B pairs and t the exponentiated logit scale::

    C = X Y^T     V = X X^T     U = Y Y^T
    CLIP      = (CE(t C) + CE(t C^T)) / 2
    in-modal  = 1/B * sum_{j,k} (V_jk - U_jk)^2     image-image and caption-caption similarities agree
    cross     = 1/B * sum_{j,k} (C_jk - C_kj)^2     x_j . y_k and x_k . y_j agree (C symmetric)
    loss      = CLIP + w_in * in-modal + w_cross * cross          (w_in = w_cross = 0.25)

The regularisers use the cosines themselves (no t), so they vanish when the two modalities coincide.

Across ranks: x, y gathered in rank order. ``local_loss=False``: every rank computes all three terms over the
gathered batch. ``local_loss=True``: rows j are the rank's own pairs and columns k the gathered batch; each
regulariser is then ``1/B_local * sum_{j local, k}``, so that the mean over ranks equals the global value
(CLIP term as upstream's ClipLoss with ``local_loss``).
"""
from __future__ import annotations

from typing import Optional

from ._common import AlignLoss, as_scale, check_pair, contrastive
from .distributed import DistributedConfig
from .registry import register_loss


@register_loss("cyclip")
class CyCLIPLoss(AlignLoss):
    """CyCLIP: CLIP loss + in-modal (--cyclip-inmodal-weight) and cross-modal (--cyclip-crossmodal-weight)
    cycle-consistency of the cosine similarities"""
    options = {"inmodal_weight": "CyCLIP: weight of the in-modal cyclic term",
               "crossmodal_weight": "CyCLIP: weight of the cross-modal cyclic term"}

    def __init__(self, inmodal_weight: float = 0.25, crossmodal_weight: float = 0.25,
                 dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        self.inmodal_weight = float(inmodal_weight)
        self.crossmodal_weight = float(crossmodal_weight)

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        batch = check_pair(self.loss_name, image_features, text_features)
        d = self.dist
        x_all, y_all = d.gather(image_features, text_features)
        x, y = d.anchors(image_features, x_all), d.anchors(text_features, y_all)
        rows = x.shape[0]
        scale = as_scale(logit_scale, x.dtype, x.device)
        inmodal = ((x @ x_all.T - y @ y_all.T) ** 2).sum() / rows
        crossmodal = ((x @ y_all.T - y @ x_all.T) ** 2).sum() / rows      # C_jk - C_kj for rows j
        terms = {
            "contrastive_loss": contrastive(x, y, x_all, y_all, scale, d.row_offset(batch)),
            "cyclip_inmodal_loss": self.inmodal_weight * inmodal,
            "cyclip_crossmodal_loss": self.crossmodal_weight * crossmodal,
        }
        return self._finish(terms, output_dict)
