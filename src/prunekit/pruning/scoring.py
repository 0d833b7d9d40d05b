"""Score a model directory: where its weights come from (whole, one decoder layer at a time, or a quantized
frozen base built a layer at a time) and which criterion scores it. The score stage's one library call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.pipeline.params import ScoreParams
from prunekit.quant.schemes import QuantSettings


@dataclass(frozen=True)
class ModelSource:
    """A model directory and how to hold it: ``offload`` ``none`` (whole, ``device_map`` allowed) or ``layerwise``
    (one decoder layer at a time, hidden states in memory up to ``activations_mib``)."""

    path: Path
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    offload: str = "none"
    activations_mib: int = 2048


@dataclass(frozen=True)
class QuantizedBase:
    """A frozen base whose ``targets`` Linears are held in ``scheme`` (the lora criterion on a QLoRA base)."""

    scheme: str
    settings: QuantSettings
    targets: tuple[str, ...]


def load_quantized_base(source: ModelSource, base: QuantizedBase) -> nn.Module:
    """The model of ``source`` with the ``base.targets`` of every layer quantized as that layer is read: the float
    model never exists whole (one float layer at a time on top of the quantized ones)."""
    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.quant.realise import quantize_linears
    from prunekit.quant.schemes import SCHEMES

    scheme = SCHEMES.get(base.scheme)
    lw = LayerwiseModel(source.path, source.dtype, source.device)
    return lw.whole(lambda _idx, layer: quantize_linears(layer, base.targets, scheme, base.settings))


def score_directory(
    source: ModelSource,
    criterion: str,
    units: list[str],
    calibration: torch.Tensor,
    batch_size: int,
    seed: int,
    options: ScoreParams,
    base: QuantizedBase | None = None,
) -> dict[str, torch.Tensor]:
    """Scores ``"<unit>.<layer>"`` of every layer, with the criterion's side data (``aux.*``: FLAP's channel means)."""
    from prunekit.models.families import adapter_for
    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.models.loading import load_model, model_shapes
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.criteria.base import LayerCriterion
    from prunekit.pruning.support import check_support

    scorer = CRITERIA.get(criterion)
    shapes, family = model_shapes(source.path)
    check_support(family, shapes, units, criterion)  # the family's and the model's refusals before any weight is read
    layerwise = None
    if base is not None:
        model = load_quantized_base(source, base)
        adapter = adapter_for(model.config)
    elif source.offload == "layerwise":
        layerwise = LayerwiseModel(source.path, source.dtype, source.device)
        model, adapter = layerwise.model, layerwise.adapter  # weights on the meta device until a layer runs
    else:
        model, _, adapter = load_model(source.path, source.dtype, source.device, source.device_map)
    req = ScoreRequest(units, list(range(len(adapter.layers(model)))), calibration, batch_size, seed, options)
    if not isinstance(scorer, LayerCriterion):  # params validation admits only shape-only ones (random) layerwise
        return scorer.score(model, adapter, req)
    if layerwise is not None:
        scores, aux = scorer.score_layerwise(layerwise, adapter, req, source.activations_mib)
    else:
        scores, aux = scorer.score_with_aux(model, adapter, req)
    return {**scores, **aux}
