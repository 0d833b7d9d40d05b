"""LLM-Pruner's Taylor criteria: importance from the gradient of the language-modelling loss.

Source: Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023).
For a weight element w with gradient g of the LM loss on the calibration data, the first-order
Taylor estimate of the loss change when w is set to zero is |w * g|; ``param_first`` sums it over
the unit's weights (the paper's default, element-wise then summed per group).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores, reduce_elementwise
from prunekit.models.adapters import ModelAdapter

log = logging.getLogger(__name__)


def accumulate_lm_gradients(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> None:
    """Set each parameter's ``.grad`` to the gradient of the mean token NLL over all calibration windows."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    n = calibration.shape[0]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    for start in tqdm(range(0, n, batch_size), desc="gradients", unit="batch"):
        batch = calibration[start : start + batch_size].to(device)
        out = model(input_ids=batch, labels=batch)
        # Weight each batch by its share of windows so the sum equals the mean over all windows.
        (out.loss * batch.shape[0] / n).backward()
    model.train(was_training)


class ParamFirst(Criterion):
    """sum over the unit's weights of |w * dL/dw| (LLM-Pruner ``param_first``)."""

    name = "param_first"

    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        params = list(model.parameters())
        old_flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            accumulate_lm_gradients(model, req.calibration, req.batch_size)
            with torch.no_grad():
                return reduce_elementwise(model, adapter, req, lambda p: (p.detach() * p.grad).abs())
        finally:
            model.zero_grad(set_to_none=True)
            for p, flag in zip(params, old_flags):
                p.requires_grad_(flag)


CRITERIA.register(ParamFirst.name)(ParamFirst())
