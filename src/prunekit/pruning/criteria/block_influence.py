"""ShortGPT's Block Influence: how much a decoder layer changes the hidden states it receives.

Source: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect" (2024).
For layer i with input hidden states ``h_in`` and output ``h_out`` (the residual stream before and after
the layer), ``BI_i = 1 - mean over tokens of cos(h_in[t], h_out[t])``, the mean running over every token
of every calibration window. A layer that barely turns the residual stream (BI near 0) is the cheapest to
remove, so the score is BI itself (higher = more important) and it scores only the ``layer`` unit.

One forward pass of the decoder with ``output_hidden_states``: ``hidden_states[i]`` is the input of layer
i and ``hidden_states[i + 1]`` its output, except that transformers replaces the last entry by the final
norm's output; the last layer's raw output is taken with a forward hook on that layer instead.
Cosines are computed in float64 from the model's hidden states.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.pruning.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores

log = logging.getLogger(__name__)

SUPPORTED_UNITS = ("layer",)


class BlockInfluence(Criterion):
    """1 - mean cosine between a layer's input and output hidden states (ShortGPT; ``layer`` unit only)."""

    name = "block_influence"

    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        for unit in req.units:
            if unit not in SUPPORTED_UNITS:
                raise PrunekitError(
                    f"criterion '{self.name}' does not support unit type '{unit}'; it scores only "
                    f"{', '.join(SUPPORTED_UNITS)} (whole decoder layers)"
                )
        cos_sum = block_cosine_sums(model, adapter, req.calibration, req.batch_size)
        tokens = req.calibration.numel()
        scores = {f"layer.{idx}": (1.0 - cos_sum[idx] / tokens).reshape(1) for idx in req.layers}
        log.info("block influence: %s", {k: round(float(v), 4) for k, v in scores.items()})
        return scores


@torch.no_grad()
def block_cosine_sums(
    model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Per decoder layer, the sum over all calibration tokens of cos(layer input, layer output) -> (L,) float64."""
    layers = adapter.layers(model)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    last_out: list[torch.Tensor] = []
    handle = layers[-1].register_forward_hook(lambda _m, _a, out: last_out.append(_hidden(out)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size].to(device)
            last_out.clear()
            states = decoder(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            states = [*states[: len(layers)], last_out[-1]]  # raw output of the last layer, not the final norm's
            for i in range(len(layers)):
                # device_map='auto' may put consecutive layers on different devices
                a, b = states[i].to(torch.float64), states[i + 1].to(states[i].device, torch.float64)
                sums[i] += F.cosine_similarity(a, b, dim=-1).sum().cpu()
    finally:
        handle.remove()
        model.train(was_training)
    return sums


def _hidden(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A decoder layer's output hidden states (older transformers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


CRITERIA.register(BlockInfluence.name)(BlockInfluence())
