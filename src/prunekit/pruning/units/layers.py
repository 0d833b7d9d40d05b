"""Depth pruning: whole decoder layers (ShortGPT).

A ``layer`` unit is one decoder layer and owns every parameter in it (each parameter is one member whose
single unit spans its first axis), so the member machinery gives magnitude/Taylor scores (sum over the
layer's weights) and its parameter count for free, and ``mode="mask"`` zeroes the whole layer, which turns
it into the identity (o_proj and down_proj are zero, so both residual branches add nothing).

Slicing removes the layer from the decoder's ``ModuleList`` and keeps the model consistent:

* ``layer_idx`` of the remaining layers' modules is renumbered: the KV cache is indexed by it;
* the config's ``num_hidden_layers`` and the per-layer lists it has (``layer_types``: full or sliding
  attention per layer, Qwen2; ``layer_sizes``: prunekit's per-layer widths) keep the remaining layers'
  entries, and ``max_window_layers`` (Qwen2: layers below it use full attention) becomes the number of
  remaining layers below it. Mistral's sliding window is one setting for all layers and needs nothing.

The config is edited in place because the decoder and its modules hold the same config object and read
``layer_types`` / ``num_hidden_layers`` from it at run time (masks, cache). Layers are removed after the
width units of the same plan (``order``), so width indices refer to the dense layer numbering.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.units.base import UNITS, Member, UnitType

log = logging.getLogger(__name__)

# Config attributes holding one entry per decoder layer.
PER_LAYER_LISTS = ("layer_types", "layer_sizes")


class DecoderLayerUnit(UnitType):
    """A whole decoder layer: removing it deletes the layer (depth pruning)."""

    name = "layer"
    description = "a whole decoder layer (depth pruning, ShortGPT): removed from the model"
    whole_layer = True

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        return 1

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        return [Member(path, 0, p.shape[0]) for path, p in layer.named_parameters()]

    def apply_model(self, model: CausalLM, adapter: ModelAdapter, keep: dict[int, list[int]], mode: str) -> None:
        drop = sorted(idx for idx, kept in keep.items() if not kept)
        if mode == "slice":
            remove_layers(model, adapter, drop)
            return
        layers = adapter.layers(model)
        for idx in drop:
            self.apply(adapter, layers[idx], torch.zeros(0, dtype=torch.long), mode)


def remove_layers(model: CausalLM, adapter: ModelAdapter, drop: list[int]) -> None:
    """Delete decoder layers ``drop`` in place, renumber the rest and update the config."""
    layers = adapter.layers(model)
    n_old = len(layers)
    if not drop:
        return
    if len(set(drop)) == n_old:
        raise PrunekitError(f"the plan removes all {n_old} decoder layers; keep at least one")
    kept = [i for i in range(n_old) if i not in set(drop)]
    for idx in sorted(set(drop), reverse=True):
        del layers[idx]  # ModuleList renumbers its keys, so state-dict names stay contiguous
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_idx)  # noqa: B010  (transformers' attribute on any submodule)
    configs = {id(c): c for c in (getattr(model, "config", None), getattr(model.get_decoder(), "config", None))}
    for config in configs.values():
        if config is not None:
            drop_from_config(config, kept, n_old)
    log.info("removed decoder layers %s; %d of %d remain", sorted(set(drop)), len(kept), n_old)


def drop_from_config(config: Any, kept: list[int], n_old: int) -> None:
    """Keep only the entries of layers ``kept`` (old indices) in ``config``'s per-layer settings, in place."""
    for key in PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == n_old:
            setattr(config, key, [values[i] for i in kept])
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and window < n_old:  # at or above n_old it covers every layer either way
        config.max_window_layers = sum(1 for i in kept if i < window)
    config.num_hidden_layers = len(kept)


UNITS.register(DecoderLayerUnit.name)(DecoderLayerUnit())
