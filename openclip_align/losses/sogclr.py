"""SogCLR: contrastive learning with per-sample moving-average normalisers (small batches suffice).

Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does Not Harm
Performance", ICML 2022.

With x_i, y_i the L2-normalised image / caption features of pair i, idx(i) its dataset index, B pairs in the
(global) batch, tau the temperature and gamma the moving-average rate::

    d_ij  = x_i . y_j - x_i . y_i                     (image anchor i, negative caption j != i)
    g_i   = 1/(B-1) * sum_{j != i} exp(d_ij / tau)
    s_I[idx(i)] <- (1 - gamma) s_I[idx(i)] + gamma g_i          (s_I[idx(i)] = g_i on the first visit)
    L_img = mean_i  1/(B-1) * sum_{j != i}  sg( exp(d_ij / tau) / s_I[idx(i)] ) * d_ij
    L_txt = the same with caption anchors: e_ji = y_j . x_i - y_j . y_j over images i != j, state s_T
    loss  = L_img + L_txt

The weights are stop-gradient, so the gradient of L_img is that of the global objective
``tau * mean_i log( mean_j exp(d_ij / tau) )`` with the inner mean over the whole dataset estimated by s; with
gamma = 1 it is exactly tau times the gradient of the decoupled contrastive loss (no positive in the
denominator). The state is stored as log s (an O(N) float32 buffer per side, N = ``num_samples``): the moving
average is taken in the log domain, which is a running-max shift that can never overflow exp(d / tau).
The ``visited`` buffer marks indices seen at least once. ``state_dict()`` holds all three, so a resumed run
continues exactly.

Across ranks: features and dataset indices are gathered in rank order. ``local_loss=False``: every rank
computes the loss and the state update over the gathered batch (the state stays identical on all ranks).
``local_loss=True``: anchor rows are the rank's own pairs against gathered columns (B - 1 counts the global
batch); the updated values of the local rows are then gathered so that every rank writes the same state.
With ``--accum-freq N`` the trainer calls the loss N times per step on one batch: the state is updated on
the first call of each step and the later calls reuse it. An index appearing twice in one global batch
keeps the larger value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import (AlignLoss, check_pair, check_positive, check_rate, check_values, log_moving_average,
                      targets)
from .distributed import DistributedConfig, compute_dtype, no_autocast, touch
from .registry import NEEDS_INDEX, register_loss

INDEX_HINT = ("--loss {name} needs a per-sample dataset index (a stable integer per training pair, passed as "
              "index=...) to keep its per-sample state; give the csv an index column, or the shards KEY.json "
              "files with an \"index\" field or embedding columns, whose json records where each shard's "
              "numbering starts (`openclip-align embed --data SHARDS` writes them beside the shards)")


def check_index(name: str, index, batch: int, num_samples: int, device) -> torch.Tensor:
    """The dataset index of each pair: (B,) integers in [0, num_samples), returned on ``device``.

    The range is checked while the index is on the CPU (before it is moved), and not inside
    :func:`~openclip_align.losses._common.inputs_validated`, where the trainer has checked it on the host
    already: on an accelerator the check would stall the host every step.
    """
    if index is None:
        raise ValueError(INDEX_HINT.format(name=name) + "; none was given")
    index = torch.as_tensor(index)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"--loss {name}: the dataset index must hold integers, got dtype {index.dtype}")
    if index.numel() != batch or (index.dim() > 1 and index.shape[0] != batch):
        raise ValueError(f"--loss {name}: got {index.numel()} dataset indices (shape {tuple(index.shape)}) for a "
                         f"batch of {batch} pairs; expected one per pair")
    index = index.reshape(batch).long()
    if check_values(index):
        outside = (index < 0) | (index >= num_samples)
        if bool(outside.any()):
            raise ValueError(index_error(name, int(index[outside][0]), num_samples))
    return index.to(device, non_blocking=True)


def index_error(name: str, bad: int, num_samples: int) -> str:
    return (f"--loss {name}: dataset index {bad} is outside the per-sample state of size {num_samples} "
            f"(num_samples, the training set size); indices must lie in [0, {num_samples}); the state does not grow")


def negatives_mask(rows: int, cols: int, offset: int, device) -> torch.Tensor:
    """True everywhere except the positive (row i, column offset + i). Built by a comparison: an indexed
    assignment of a Python scalar (``mask[i, j] = False``) copies the scalar to the device synchronously."""
    return torch.arange(cols, device=device)[None, :] != targets(rows, offset, device)[:, None]


@register_loss("sogclr", needs={NEEDS_INDEX}, stateful=True)
class SogCLRLoss(AlignLoss):
    """SogCLR: contrastive loss with per-sample moving-average normalisers (--sogclr-gamma) at a fixed
    temperature (--sogclr-tau); needs a stable per-pair dataset index; state saved in checkpoints"""
    options = {"gamma": "SogCLR: moving-average rate of the per-sample normalisers",
               "tau": "SogCLR: temperature"}

    def __init__(self, num_samples: int, gamma: float = 0.8, tau: float = 0.01, accum_freq: int = 1,
                 dist: Optional[DistributedConfig] = None):
        super().__init__(dist)
        if num_samples is None or int(num_samples) <= 0:
            from openclip_align.data.sizes import SIZES_FILE      # the data side owns the file's name

            raise ValueError(
                f"--loss sogclr keeps a moving average per training sample and needs the training set size "
                f"(num_samples) to size that state; got {num_samples!r}. The trainer reads it as the csv's row "
                "count, or for shards from their record (`openclip-align data check --data SHARDS` writes it, and "
                f"a {SIZES_FILE}) or a {SIZES_FILE} beside them; shards are never counted before step 1 "
                "(--train-num-samples only sets the epoch length, not this size)")
        self.num_samples = int(num_samples)
        self.gamma = check_rate(self.loss_name, "--sogclr-gamma", gamma)
        self.tau = check_positive(self.loss_name, "--sogclr-tau", tau)
        self.accum_freq = max(1, int(accum_freq))
        self._calls = 0
        self.register_buffer("log_s_image", torch.zeros(self.num_samples, dtype=torch.float32))
        self.register_buffer("log_s_text", torch.zeros(self.num_samples, dtype=torch.float32))
        self.register_buffer("visited", torch.zeros(self.num_samples, dtype=torch.bool))

    def forward(self, image_features, text_features, logit_scale, index=None, output_dict=False, **kwargs):
        batch = check_pair(self.loss_name, image_features, text_features)
        device = image_features.device
        index = check_index(self.loss_name, index, batch, self.num_samples, device)
        if self.log_s_image.device != device:
            self.to(device)
        d = self.dist
        x_all, y_all = d.gather(image_features, text_features)
        (index_all,) = d.gather_no_grad(index)
        with no_autocast(device):                         # fixed small temperature: full precision
            dtype = compute_dtype(image_features)
            x, y = d.anchors(image_features, x_all).to(dtype), d.anchors(text_features, y_all).to(dtype)
            x_all, y_all = x_all.to(dtype), y_all.to(dtype)
            rows, cols, offset = x.shape[0], x_all.shape[0], d.row_offset(batch)
            if cols < 2:
                raise ValueError("--loss sogclr needs at least 2 pairs in the (global) batch")
            negatives = negatives_mask(rows, cols, offset, device)
            paired = (x * y).sum(dim=-1, keepdim=True)                 # C_ii
            diff_image = x @ y_all.T - paired                          # d_ij, image anchors
            diff_text = y @ x_all.T - paired                           # e_ji, caption anchors

            update = self._calls % self.accum_freq == 0
            self._calls += 1
            with torch.no_grad():
                rows_index = d.anchors(index, index_all)
                log_s_image = self._normaliser(diff_image, negatives, self.log_s_image, rows_index, index_all, update)
                log_s_text = self._normaliser(diff_text, negatives, self.log_s_text, rows_index, index_all, update)
                if update:
                    self.visited.index_fill_(0, index_all, True)      # no host-to-device copy of the value

            terms = {
                "sogclr_image_loss": self._surrogate(diff_image, negatives, log_s_image, cols),
                "sogclr_text_loss": self._surrogate(diff_text, negatives, log_s_text, cols),
            }
            terms["sogclr_image_loss"] = touch(terms["sogclr_image_loss"], logit_scale)
        return self._finish(terms, output_dict)

    def _normaliser(self, diff, negatives, state, rows_index, index_all, update: bool) -> torch.Tensor:
        """log s for the anchor rows (after this step's update, which is written to ``state``)."""
        if not update:
            return state[rows_index].to(diff.dtype)
        scaled = (diff.detach() / self.tau).masked_fill(~negatives, float("-inf"))
        log_g = torch.logsumexp(scaled, dim=1) - math.log(diff.shape[1] - 1)
        new = log_moving_average(state[rows_index], log_g, self.gamma, ~self.visited[rows_index])
        new_all = self.dist.gather_no_grad(new)[0] if self.dist.rows_are_local else new
        state.scatter_reduce_(0, index_all, new_all.to(state.dtype), reduce="amax", include_self=False)
        return new

    def _surrogate(self, diff, negatives, log_s, cols: int) -> torch.Tensor:
        with torch.no_grad():
            scaled = (diff.detach() / self.tau).masked_fill(~negatives, float("-inf"))   # positives weigh 0
            weights = torch.exp(scaled - log_s[:, None])
        return ((weights * diff).sum(dim=1) / (cols - 1)).mean()
