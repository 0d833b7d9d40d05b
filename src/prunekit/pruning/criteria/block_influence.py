"""ShortGPT's Block Influence: how much a decoder layer changes the hidden states it receives.

Source: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect" (2024).
For layer i with input hidden states ``h_in`` and output ``h_out`` (the residual stream before and after
the layer), ``BI_i = 1 - mean over tokens of cos(h_in[t], h_out[t])``, the mean running over every token
of every calibration window. A layer that barely turns the residual stream (BI near 0) is the cheapest to
remove, so the score is BI itself (higher = more important) and it scores only the ``layer`` unit.

One forward pass of the decoder; a forward hook on each scored layer takes its input and raw output (the
residual stream, before any final norm). Cosines are computed in float64 from the model's hidden states.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.base import CRITERIA, LayerCriterion, ScoreRequest, Scores
from prunekit.pruning.units import UNITS

log = logging.getLogger(__name__)


class BlockInfluence(LayerCriterion):
    """1 - mean cosine between a layer's input and output hidden states (ShortGPT; ``layer`` unit only)."""

    name = "block_influence"

    def check(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> None:
        for unit in req.units:
            if not UNITS.get(unit).whole_layer:
                whole = [n for n, u in UNITS.items() if u.whole_layer]
                raise PrunekitError(
                    f"criterion '{self.name}' does not support unit type '{unit}'; it scores only "
                    f"{', '.join(whole)} (whole decoder layers)"
                )

    def probe(self, adapter: ModelAdapter, idx: int, layer: Submodule, req: ScoreRequest) -> _CosineProbe:
        return _CosineProbe(idx, layer, int(req.calibration.numel()))


class _CosineProbe:
    """Sum over tokens of cos(layer input, layer output), in float64, from hooks on the layer."""

    def __init__(self, idx: int, layer: Submodule, n_tokens: int) -> None:
        self.idx, self.n_tokens = idx, n_tokens
        self.total = torch.zeros((), dtype=torch.float64)
        self.handle = layer.register_forward_hook(self._add, with_kwargs=True)

    def _add(self, _m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        h_in = args[0] if args else kwargs["hidden_states"]
        a, b = h_in.detach().to(torch.float64), _hidden(out).detach().to(h_in.device, torch.float64)
        self.total += F.cosine_similarity(a, b, dim=-1).sum().cpu()

    def finish(self) -> tuple[Scores, dict[str, torch.Tensor]]:
        score = (1.0 - self.total / self.n_tokens).reshape(1)
        log.info("block influence of layer %d: %.4f", self.idx, float(score))
        return {f"layer.{self.idx}": score}, {}

    def remove(self) -> None:
        self.handle.remove()


def _hidden(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A decoder layer's output hidden states (older transformers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


CRITERIA.register(BlockInfluence.name)(BlockInfluence())
