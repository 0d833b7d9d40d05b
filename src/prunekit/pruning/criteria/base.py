"""The criterion contract: one importance score per unit, higher = more important."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.pipeline.params import ScoreParams
from prunekit.pruning.units import UNITS
from prunekit.registry import Registry


@dataclass(frozen=True)
class ScoreRequest:
    """What to score: unit types and layer indices, with calibration tokens and a seed."""

    units: list[str]
    layers: list[int]
    calibration: torch.Tensor  # (N, T) token ids
    batch_size: int
    seed: int
    # The ``score`` section of params.yaml: criterion-specific settings (e.g. LoRA rank for ``lora``).
    options: Mapping[str, Any] = field(default_factory=dict)


Scores = dict[str, torch.Tensor]  # "<unit>.<layer>" -> (count,) float64


def score_settings(options: Mapping[str, Any]) -> ScoreParams:
    """The ``score`` options with ScoreParams' defaults for any key left out (validated)."""
    return ScoreParams(**{k: v for k, v in options.items() if k in ScoreParams.model_fields})


class Criterion(ABC):
    """Scores every requested unit. ``score`` leaves the model's weights unchanged."""

    name = ""
    # True when scoring differentiates the base weights themselves (the Taylor criteria): such a
    # criterion needs them in the model's training dtype (``score.base_dtype`` must stay null).
    base_gradients = False

    @abstractmethod
    def score(self, model: nn.Module, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        """Importance of each unit of each requested type and layer."""


def reduce_elementwise(
    model: nn.Module,
    adapter: ModelAdapter,
    req: ScoreRequest,
    elementwise: Callable[[torch.Tensor], torch.Tensor],
) -> Scores:
    """Scores of the form sum over a unit's weights of ``elementwise(param)`` (param has .grad where needed)."""
    out: Scores = {}
    layers = adapter.layers(model)
    for unit in req.units:
        ut = UNITS.get(unit)
        for idx in ut.score_layers(req.layers):
            layer = layers[idx]
            values = {m.path: elementwise(layer.get_parameter(m.path)) for m in ut.members(adapter, layer)}
            out[f"{unit}.{idx}"] = ut.reduce(adapter, layer, values)
    return out


CRITERIA: Registry[Criterion] = Registry("criterion")
