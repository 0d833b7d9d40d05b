"""The criterion contract: one importance score per unit, higher = more important."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pipeline.params import ScoreParams
from prunekit.pruning.units import UNITS
from prunekit.registry import Registry

if TYPE_CHECKING:
    from prunekit.models.layerwise import LayerwiseModel


@dataclass(frozen=True)
class ScoreRequest:
    """What to score: unit types and layer indices, with calibration tokens and a seed."""

    units: list[str]
    layers: list[int]
    calibration: torch.Tensor  # (N, T) token ids
    batch_size: int
    seed: int
    # The ``score`` section of params.yaml: criterion-specific settings (e.g. LoRA rank for ``lora``).
    options: ScoreParams = field(default_factory=ScoreParams)


Scores = dict[str, torch.Tensor]  # "<unit>.<layer>" -> (count,) float64


class Criterion(ABC):
    """Scores every requested unit. ``score`` leaves the model's weights unchanged."""

    name = ""
    # True when scoring differentiates the base weights themselves (the Taylor criteria): such a
    # criterion needs them in the model's training dtype (``score.base_dtype`` must stay null).
    base_gradients = False
    # True when it can score on a frozen base whose Linears are quantized (``score.base_quant``): it differentiates
    # only adapters on top of them (LoRAPrune's ``lora``).
    quantized_base = False

    @abstractmethod
    def score(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        """Importance of each unit of each requested type and layer."""


class LayerProbe(Protocol):
    """What a :class:`LayerCriterion` attaches to one decoder layer: hooks that observe its forward passes."""

    def finish(self) -> tuple[Scores, dict[str, torch.Tensor]]:
        """(scores of this layer's units, side data), once every calibration batch has passed the layer."""

    def remove(self) -> None:
        """Detach the hooks."""


class LayerCriterion(Criterion):
    """A criterion whose scores of layer i need only layer i's weights and the hidden states entering it.

    Such a criterion scores a model held whole in memory (one batch-major forward pass of the decoder with a
    probe on every layer) or one streamed from disk a layer at a time (``model.offload: layerwise``,
    :meth:`score_layerwise`): the same probe code sees the same tensors either way.
    """

    # False: the scores read only the weights (no calibration forward pass).
    needs_forward = True

    def check(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> None:
        """Refuse unsupported requests before any work (``model``'s shapes are real, its weights may be meta)."""

    @abstractmethod
    def probe(self, adapter: ModelAdapter, idx: int, layer: Submodule, req: ScoreRequest) -> LayerProbe:
        """Attach to layer ``idx`` (its weights loaded) before the calibration batches pass it."""

    def score(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        return self.score_with_aux(model, adapter, req)[0]

    def score_with_aux(
        self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest
    ) -> tuple[Scores, dict[str, torch.Tensor]]:
        """(scores, side data such as channel means) of a model held in memory."""
        self.check(model, adapter, req)
        layers = adapter.layers(model)
        probes: list[LayerProbe] = []
        try:
            # A model-wide unit type is scored at layer 0 whichever layers are asked (UnitType.score_layers).
            for idx in sorted({i for u in req.units for i in UNITS.get(u).score_layers(req.layers)}):
                probes.append(self.probe(adapter, idx, layers[idx], req))
            if self.needs_forward:
                forward_decoder(model, req.calibration, req.batch_size)
            return _merge(p.finish() for p in probes)
        finally:
            for p in probes:
                p.remove()

    def score_layerwise(
        self, lw: LayerwiseModel, adapter: ModelAdapter, req: ScoreRequest, activations_mib: int = 2048
    ) -> tuple[Scores, dict[str, torch.Tensor]]:
        """:meth:`score_with_aux` with one decoder layer in memory at a time (layers past the last scored
        one are never read)."""
        from contextlib import contextmanager

        self.check(lw.model, adapter, req)
        for unit in req.units:
            if UNITS.get(unit).model_wide:
                raise PrunekitError(
                    f"unit type '{unit}' spans every layer (and the embedding); model.offload: layerwise scores one "
                    "layer at a time: drop it from prune.units or set model.offload: none"
                )
        wanted = set(req.layers)
        parts: list[tuple[Scores, dict[str, torch.Tensor]]] = []

        @contextmanager
        def around(idx: int, layer: Submodule) -> Iterator[None]:
            if idx not in wanted:
                yield
                return
            p = self.probe(adapter, idx, layer, req)
            try:
                yield
                parts.append(p.finish())
            finally:
                p.remove()

        hidden = lw.run(
            req.calibration,
            req.batch_size,
            around,
            last=max(req.layers),
            forward=self.needs_forward,
            activations_mib=activations_mib,
        )
        hidden.close()
        return _merge(parts)


def _merge(parts: Any) -> tuple[Scores, dict[str, torch.Tensor]]:
    scores: Scores = {}
    aux: dict[str, torch.Tensor] = {}
    for s, a in parts:
        scores |= s
        aux |= a
    return scores, aux


@torch.no_grad()
def forward_decoder(model: CausalLM, calibration: torch.Tensor, batch_size: int) -> None:
    """The decoder alone over the calibration windows, in eval mode, no KV cache (probes read its layers)."""
    from tqdm.auto import tqdm

    decoder = model.get_decoder()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, calibration.shape[0], batch_size), desc="forward", unit="batch"):
            decoder(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)


def reduce_elementwise(
    model: CausalLM,
    adapter: ModelAdapter,
    req: ScoreRequest,
    elementwise: Callable[[torch.Tensor], torch.Tensor],
) -> Scores:
    """Scores of the form sum over a unit's weights of ``elementwise(param)`` (param has .grad where needed)."""
    out: Scores = {}
    layers = adapter.layers(model)
    for unit in req.units:
        for idx in UNITS.get(unit).score_layers(req.layers):
            out |= reduce_layer(adapter, idx, layers[idx], [unit], elementwise)
    return out


def reduce_layer(
    adapter: ModelAdapter,
    idx: int,
    layer: Submodule,
    units: list[str],
    elementwise: Callable[[torch.Tensor], torch.Tensor],
) -> Scores:
    """:func:`reduce_elementwise`'s scores of the ``units`` of one layer."""
    out: Scores = {}
    for unit in units:
        ut = UNITS.get(unit)
        values = {m.path: elementwise(layer.get_parameter(m.path)) for m in ut.members(adapter, layer)}
        out[f"{unit}.{idx}"] = ut.reduce(adapter, layer, values)
    return out


CRITERIA: Registry[Criterion] = Registry("criterion")
