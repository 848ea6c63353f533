"""VICReg between the two modalities: invariance + variance + covariance on raw projections.

Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022; used here with the image and caption projections as the two branches.

With X, Y the unnormalised (B, d) image / caption projections of B pairs::

    sim   = mean_{i,k} (x_ik - y_ik)^2
    var(Z)= mean_k relu(1 - sqrt(Var_i(z_ik) + 1e-4))      Var with the unbiased (B - 1) denominator
    cov(Z)= sum_{k != l} Cov(Z)_kl^2 / d,   Cov(Z) = (Z - mean Z)^T (Z - mean Z) / (B - 1)
    loss  = 25 * sim + 25 * (var(X) + var(Y)) / 2 + 1 * (cov(X) + cov(Y))

Across ranks the variance and covariance are statistics of the gathered (global) batch, computed by every
rank on the gathered projections; this rank's own rows always keep their gradient (also under
``local_loss``), the other ranks' rows carry gradient only with ``gather_with_grad``. The invariance term is
per pair: over the gathered batch, or the mean over the rank's own rows with ``local_loss``. Either way the
mean over ranks of each term equals its value for one process on the concatenated batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import AlignLoss, check_pair
from .distributed import DistributedConfig, compute_dtype, touch
from .registry import register_loss

EPS = 1e-4


def variance_term(z: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - torch.sqrt(z.var(dim=0) + EPS)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    n, dim = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return (off_diagonal ** 2).sum() / dim


@register_loss("vicreg", raw_features=True)
class VICRegLoss(AlignLoss):
    """VICReg across modalities: invariance (MSE of image and caption projections) + variance + covariance
    regularisers on unnormalised features"""
    options = {"sim_weight": "VICReg: weight of the invariance (MSE) term",
               "var_weight": "VICReg: weight of the variance term",
               "cov_weight": "VICReg: weight of the covariance term"}

    def __init__(self, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
                 dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        self.sim_weight, self.var_weight, self.cov_weight = float(sim_weight), float(var_weight), float(cov_weight)

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        check_pair(self.loss_name, image_features, text_features)
        d, dtype = self.dist, compute_dtype(image_features)
        x_all, y_all = (t.to(dtype) for t in d.gather_keep_local(image_features, text_features))
        if x_all.shape[0] < 2:
            raise ValueError("--loss vicreg needs at least 2 pairs in the (global) batch for its variance terms")
        x = d.anchors(image_features.to(dtype), x_all)
        y = d.anchors(text_features.to(dtype), y_all)
        terms = {
            "vicreg_sim_loss": self.sim_weight * F.mse_loss(x, y),
            "vicreg_var_loss": self.var_weight * (variance_term(x_all) + variance_term(y_all)) / 2,
            "vicreg_cov_loss": self.cov_weight * (covariance_term(x_all) + covariance_term(y_all)),
        }
        terms["vicreg_sim_loss"] = touch(terms["vicreg_sim_loss"], logit_scale)
        return self._finish(terms, output_dict)
