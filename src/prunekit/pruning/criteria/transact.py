"""TransAct's criterion: the L2 norm of the transitional activations (``activation``).

Source: TransAct ("prune transitional activations, keep the residual stream"); see ../shared/PRIOR-ART.md.
The transitional activations are the inputs of ``o_proj`` (per-head attention outputs, concatenated) and
of ``down_proj`` (``act(gate(x)) * up(x)``). With ``x_tj`` channel j at token t over all calibration
tokens and samples:

    channel score       c_j = ||X_j||_2 = sqrt(sum_t x_tj^2)
    MLP channel         s   = c_j
    query head h        s_h = mean_{d < hd} c_{h*hd+d} + (10 / hd) * max_{d < hd} c_{h*hd+d}
    KV group g          s_g = sum of s_h over its n_rep query heads h = g*n_rep ... (g+1)*n_rep - 1

The paper scores single heads; a GQA KV group is removed with all its query heads, so its score is the
sum of theirs (the same aggregation as every other criterion here: a unit's importance is the total of
what it removes). "max" is the largest per-dimension norm of the head, so no per-token maximum is
needed.
"""

from __future__ import annotations

import torch

from prunekit.pruning.criteria.activations import (
    O_PROJ,
    ActivationCriterion,
    ChannelStats,
    LayerChannels,
)
from prunekit.pruning.criteria.base import CRITERIA

# TransAct's weight of the largest dimension norm, divided by head_dim.
MAX_WEIGHT = 10.0


def head_scores(ch: LayerChannels) -> torch.Tensor:
    """s_h = mean_d c_hd + (10 / head_dim) * max_d c_hd for every query head h -> (num_heads,)."""
    norms = ch.o.reshape(ch.num_heads, ch.head_dim)
    return norms.mean(dim=1) + (MAX_WEIGHT / ch.head_dim) * norms.amax(dim=1)


class TransActCriterion(ActivationCriterion):
    """L2 norm of the o_proj / down_proj input channels, aggregated per head as TransAct does."""

    name = "activation"

    def unit_scores(self, ch: LayerChannels, role: str, width: int) -> torch.Tensor:
        """Attention units: the sum of their query heads' scores (a KV group: its n_rep heads); MLP: the sum."""
        if role == O_PROJ:
            return head_scores(ch).reshape(-1, width // ch.head_dim).sum(dim=1)
        return super().unit_scores(ch, role, width)

    def channel_scores(self, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
        del weight  # TransAct looks at activations only
        return stats.l2


CRITERIA.register(TransActCriterion.name)(TransActCriterion())
