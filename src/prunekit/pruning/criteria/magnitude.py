"""Data-free criteria: random and weight magnitude (LLM-Pruner's baselines)."""

from __future__ import annotations

import torch

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.base import CRITERIA, Criterion, LayerCriterion, ScoreRequest, Scores, reduce_layer
from prunekit.pruning.units import UNITS


class RandomCriterion(Criterion):
    """Uniform random scores from a generator seeded by ``seed`` (a baseline; LLM-Pruner ``random``)."""

    name = "random"
    shapes_only = True  # reads the unit counts only: scores a model whose weights are still on disk

    def score(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        gen = torch.Generator().manual_seed(req.seed)
        layers = adapter.layers(model)
        return {
            f"{unit}.{idx}": torch.rand(UNITS.get(unit).count(adapter, layers[idx]), generator=gen, dtype=torch.float64)
            for unit in req.units
            for idx in UNITS.get(unit).score_layers(req.layers)
        }


class _WeightProbe:
    """Scores of one layer from its weights alone, computed while they are loaded."""

    def __init__(self, scores: Scores) -> None:
        self.scores = scores

    def finish(self) -> tuple[Scores, dict[str, torch.Tensor]]:
        return self.scores, {}

    def remove(self) -> None:
        pass


class MagnitudeCriterion(LayerCriterion):
    """Sum over the unit's weights of ``elementwise(w)``; reads the weights only (no forward pass)."""

    needs_forward = False

    @staticmethod
    def elementwise(w: torch.Tensor) -> torch.Tensor:
        """What each weight contributes."""
        raise NotImplementedError

    @torch.no_grad()
    def probe(self, adapter: ModelAdapter, idx: int, layer: Submodule, req: ScoreRequest) -> _WeightProbe:
        units = [u for u in req.units if idx in UNITS.get(u).score_layers(req.layers)]
        return _WeightProbe(reduce_layer(adapter, idx, layer, units, lambda p: self.elementwise(p.detach())))


class L1Criterion(MagnitudeCriterion):
    """Sum over the unit's weights of |w| (LLM-Pruner ``l1``)."""

    name = "l1"

    @staticmethod
    def elementwise(w: torch.Tensor) -> torch.Tensor:
        return w.abs()


class L2Criterion(MagnitudeCriterion):
    """Sum over the unit's weights of w^2: the squared L2 norm (LLM-Pruner ``l2``; same ranking as the norm)."""

    name = "l2"

    @staticmethod
    def elementwise(w: torch.Tensor) -> torch.Tensor:
        return w.square()


for _c in (RandomCriterion(), L1Criterion(), L2Criterion()):
    CRITERIA.register(_c.name)(_c)
