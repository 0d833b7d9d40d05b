"""FLAP and Wanda-sp: activation-times-weight criteria on the input channels of o_proj / down_proj.

Source: An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP,
AAAI 2024), which also defines the Wanda-sp baseline (Wanda's |W| * ||X|| made structured). W is the
weight of ``o_proj`` or ``down_proj`` (out x in), x_tj input channel j at calibration token t (all tokens
of all samples). Channel scores:

    flap      c_j = var_t(x_tj) * sum_i W_ij^2           (sample variance over tokens: the "fluctuation")
    wanda_sp  c_j = sum_i |W_ij| * ||X_j||_2              (||X_j||_2 = sqrt(sum_t x_tj^2))

A unit's score is the sum of its channels' scores: an MLP channel owns one down_proj column; a KV group
owns the o_proj columns of its n_rep query heads (n_rep * head_dim channels), a query head its head_dim.

Differences from the authors' code, none of which changes the ranking inside one projection:
Wanda-sp there averages over output rows (here: the sum, a factor hidden_size) and normalises ||X||^2
by the number of samples (a factor sqrt(N)); FLAP there keeps an approximate running variance (here:
the exact sample variance), standardises scores across layers and averages them per head for its
global allocation (standardising is the allocation's job; sum and mean per head rank heads alike).
Its code also squares the attention channel metric before summing per head; this follows the paper's
formula instead and sums the unsquared channel scores.
"""

from __future__ import annotations

import torch

from prunekit.pruning.criteria.activations import ActivationCriterion, ChannelStats
from prunekit.pruning.criteria.base import CRITERIA


class FlapCriterion(ActivationCriterion):
    """FLAP's weighted input feature variance: var(x_j) * ||W[:, j]||^2, summed per unit."""

    name = "flap"

    def channel_scores(self, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
        return stats.variance * weight.square().sum(dim=0)


class WandaSPCriterion(ActivationCriterion):
    """Wanda-sp: sum over output rows of |W[:, j]| * ||X_j||_2, summed per unit."""

    name = "wanda_sp"

    def channel_scores(self, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs().sum(dim=0) * stats.l2


for _c in (FlapCriterion(), WandaSPCriterion()):
    CRITERIA.register(_c.name)(_c)
