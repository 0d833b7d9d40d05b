"""Data-free criteria: random and weight magnitude (LLM-Pruner's baselines)."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.pruning.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores, reduce_elementwise
from prunekit.pruning.units import UNITS


class RandomCriterion(Criterion):
    """Uniform random scores from a generator seeded by ``seed`` (a baseline; LLM-Pruner ``random``)."""

    name = "random"

    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        gen = torch.Generator().manual_seed(req.seed)
        layers = adapter.layers(model)
        return {
            f"{unit}.{idx}": torch.rand(UNITS.get(unit).count(adapter, layers[idx]), generator=gen, dtype=torch.float64)
            for unit in req.units
            for idx in UNITS.get(unit).score_layers(req.layers)
        }


class L1Criterion(Criterion):
    """Sum over the unit's weights of |w| (LLM-Pruner ``l1``)."""

    name = "l1"

    @torch.no_grad()
    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        return reduce_elementwise(model, adapter, req, lambda p: p.detach().abs())


class L2Criterion(Criterion):
    """Sum over the unit's weights of w^2: the squared L2 norm (LLM-Pruner ``l2``; same ranking as the norm)."""

    name = "l2"

    @torch.no_grad()
    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        return reduce_elementwise(model, adapter, req, lambda p: p.detach().pow(2))


for _c in (RandomCriterion(), L1Criterion(), L2Criterion()):
    CRITERIA.register(_c.name)(_c)
