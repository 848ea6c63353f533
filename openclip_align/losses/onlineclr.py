"""OnlineCLR: contrastive loss with separate positive / negative temperatures and scalar moving-average
normalisers.

Source: the OnlineCLR baseline of the stochastic compositional-optimisation line of CLIP training work from
Tianbao Yang's group (SogCLR, Yuan et al. ICML 2022; iSogCLR, Qiu et al. ICML 2023; TempNet, Qiu et al.
ICML 2024), as the course study that compared it defines it (docs/methods.md; the published paper trail for
this baseline is thin: the formula below is the definition this package implements).

With x_i, y_i the L2-normalised image / caption features of the B pairs, C = X Y^T, temperatures tau_n
(negatives) and tau_p (positives) and moving-average rate gamma::

    a   = sum_{i != j} exp(C_ij / tau_n)          b = sum_i exp(-C_ii / tau_p)
    u_n <- (1 - gamma) u_n + gamma a              u_p <- (1 - gamma) u_p + gamma b
                                                  (u = the current value on the first step)
    w_ij = sg( exp(C_ij / tau_n) / u_n )          v_i = sg( exp(-C_ii / tau_p) / u_p )
    loss = sum_{i != j} w_ij C_ij  -  sum_i v_i C_ii

Its gradient is that of ``tau_n log a + tau_p log b`` with a and b replaced by their moving averages (with
gamma = 1 it is exactly that gradient). u_n and u_p are kept as log u (0-d float32 buffers): the moving
average is taken in the log domain (a log-sum-exp shift that cannot overflow); ``initialized`` records the
first step. All three are in ``state_dict()``, so a resumed run continues exactly.

Across ranks: x, y gathered in rank order. ``local_loss=False``: every rank computes the loss and the
normalisers over the gathered batch. ``local_loss=True``: rows i are the rank's own pairs against all
gathered columns; the partial log-sums are gathered (no gradient) so every rank updates the same global
u_n, u_p, and the rank returns ``world_size`` times its rows' part of the sums (mean over ranks = the loss
on the gathered batch). With ``--accum-freq N`` the normalisers are updated on the first of the N calls the
trainer makes per optimizer step and reused by the others.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import AlignLoss, check_pair, check_positive, check_rate, log_moving_average
from .distributed import DistributedConfig, compute_dtype, no_autocast, touch
from .registry import register_loss
from .sogclr import negatives_mask


@register_loss("onlineclr", stateful=True)
class OnlineCLRLoss(AlignLoss):
    """OnlineCLR: negatives at --onlineclr-tau-n and positives at --onlineclr-tau-p, normalised by moving
    averages (--onlineclr-gamma) of their sums; state saved in checkpoints"""
    options = {"tau_n": "OnlineCLR: temperature of the negatives",
               "tau_p": "OnlineCLR: temperature of the positives",
               "gamma": "OnlineCLR: moving-average rate of the normalisers"}

    def __init__(self, tau_n: float = 0.01, tau_p: float = 0.1, gamma: float = 0.8, accum_freq: int = 1,
                 dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        self.tau_n = check_positive(self.loss_name, "--onlineclr-tau-n", tau_n)
        self.tau_p = check_positive(self.loss_name, "--onlineclr-tau-p", tau_p)
        self.gamma = check_rate(self.loss_name, "--onlineclr-gamma", gamma)
        self.accum_freq = max(1, int(accum_freq))
        self._calls = 0
        self.register_buffer("log_u_n", torch.zeros((), dtype=torch.float32))
        self.register_buffer("log_u_p", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kwargs):
        batch = check_pair(self.loss_name, image_features, text_features)
        device = image_features.device
        if self.log_u_n.device != device:
            self.to(device)
        d, dtype = self.dist, compute_dtype(image_features)
        x_all, y_all = d.gather(image_features, text_features)
        with no_autocast(device):                         # fixed small temperature: full precision
            x, y = d.anchors(image_features, x_all).to(dtype), d.anchors(text_features, y_all).to(dtype)
            y_all = y_all.to(dtype)
            if y_all.shape[0] < 2:
                raise ValueError("--loss onlineclr needs at least 2 pairs in the (global) batch")
            negatives = negatives_mask(x.shape[0], y_all.shape[0], d.row_offset(batch), device)
            sims = x @ y_all.T                                        # C_ij, rows i (local or all), columns j
            paired = (x * y).sum(dim=-1)                              # C_ii

            update = self._calls % self.accum_freq == 0
            self._calls += 1
            with torch.no_grad():
                scaled_neg = (sims.detach() / self.tau_n).masked_fill(~negatives, float("-inf"))
                scaled_pos = -paired.detach() / self.tau_p
                if update:
                    log_a = torch.logsumexp(scaled_neg.flatten(), dim=0)
                    log_b = torch.logsumexp(scaled_pos, dim=0)
                    if d.rows_are_local:                              # combine the ranks' partial sums
                        parts = d.gather_no_grad(torch.stack([log_a, log_b])[None])[0]
                        log_a, log_b = torch.logsumexp(parts, dim=0)
                    first = ~self.initialized
                    log_u_n = log_moving_average(self.log_u_n, log_a, self.gamma, first)
                    log_u_p = log_moving_average(self.log_u_p, log_b, self.gamma, first)
                    self.log_u_n.copy_(log_u_n)
                    self.log_u_p.copy_(log_u_p)
                    self.initialized.fill_(True)
                else:
                    log_u_n, log_u_p = self.log_u_n.to(dtype), self.log_u_p.to(dtype)
                weights_neg = torch.exp(scaled_neg - log_u_n)            # 0 on the positives
                weights_pos = torch.exp(scaled_pos - log_u_p)

            share = float(d.world_size) if d.rows_are_local else 1.0
            terms = {
                "onlineclr_neg_loss": touch(share * (weights_neg * sims).sum(), logit_scale),
                "onlineclr_pos_loss": -share * (weights_pos * paired).sum(),
            }
        return self._finish(terms, output_dict)
