"""FLAP's bias compensation: fold the mean of every removed input channel into the projection's bias.

Source: An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP,
AAAI 2024). For a projection y = W x + b whose input columns R are removed (o_proj: the columns of the
removed heads; down_proj: the removed intermediate channels), replacing x_R by its calibration mean
m_R instead of by zero keeps the output's expectation:

    y = W_K x_K + W_R x_R + b  ~=  W_K x_K + (b + W_R m_R)     =>   b' = b + W[:, R] @ m[R]

so the compensated pruned model computes exactly the dense model with the removed channels' inputs
replaced by their means. The means come from the score stage (``aux.mean.<o_proj|down_proj>.<layer>``,
written by every activation-based criterion).

Stock Llama has no o_proj / down_proj bias; its config switches ``attention_bias`` (q, k, v and o) and
``mlp_bias`` (gate, up and down) add them, so the other projections get zero biases: the saved model is
a plain Llama (or prunekit Llama) config that ``from_pretrained`` reloads exactly. Families whose stock
config has no such switch (Mistral, Qwen2) get biases on o_proj and down_proj alone, recorded as
``output_bias: true`` in their prunekit config (:mod:`prunekit.models.modeling`), as per-layer widths are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import OUTPUT_BIAS, add_bias
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.activations import mean_key, projection
from prunekit.pruning.plan import Plan
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.base import CONSUMERS

log = logging.getLogger(__name__)


def removed_columns(model: CausalLM, adapter: ModelAdapter, plan: Plan) -> dict[tuple[str, int], torch.Tensor]:
    """Input columns of o_proj / down_proj that the plan removes, per (projection, layer) -> sorted indices.

    Every unit type of a plan numbers the dense layer's units, so the columns of several unit types on
    one projection (query heads and KV groups) are in the same numbering: what goes is their union.
    """
    from prunekit.pruning.reconstruction import removed_inputs

    for unit in plan.keep:
        if not UNITS.get(unit).input_of:
            supported = sorted(n for n, u in UNITS.items() if u.input_of)
            raise PrunekitError(
                f"prune.bias_compensation does not support unit type '{unit}' "
                f"(supported: {', '.join(supported)}); set prune.bias_compensation: false"
            )
    layers = adapter.layers(model)
    out: dict[tuple[str, int], torch.Tensor] = {}
    for idx in sorted({i for per_layer in plan.keep.values() for i in per_layer}):
        for role in CONSUMERS:
            cols = removed_inputs(adapter, layers[idx], plan, idx, role)
            if cols.numel():
                out[(role, idx)] = cols
    return out


def add_zero_biases(model: CausalLM, adapter: ModelAdapter) -> int:
    """Give o_proj and down_proj a bias (zeros where they had none), and what else the family's config needs to
    say so: with a stock switch (Llama) every q/k/v/o and gate/up/down projection; else ``output_bias`` in the
    config, which the pruned classes read. Returns how many biases were added."""
    added = sum(add_layer_biases(adapter, layer) for layer in adapter.layers(model))
    mark_biases(model.config, adapter)
    return added


def add_layer_biases(adapter: ModelAdapter, layer: Submodule) -> int:
    """:func:`add_zero_biases` for one decoder layer (its config left as it is): how many biases were added."""
    stock = adapter.output_bias
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    attn_names = (adapter.q, adapter.k, adapter.v, adapter.o) if stock else (adapter.o,)
    mlp_names = (adapter.gate, adapter.up, adapter.down) if stock else (adapter.down,)
    return sum(
        add_bias(getattr(owner, name)) for owner, names in ((attn, attn_names), (mlp, mlp_names)) for name in names
    )


def mark_biases(config: Any, adapter: ModelAdapter) -> None:
    """Say in ``config`` that every layer has the biases :func:`add_layer_biases` adds (the model classes build
    them from it: save and reload)."""
    if adapter.output_bias:
        config.attention_bias = True
        config.mlp_bias = True
    else:
        setattr(config, OUTPUT_BIAS, True)


def checked_columns(
    model: CausalLM, adapter: ModelAdapter, plan: Plan, means: Mapping[str, torch.Tensor]
) -> dict[tuple[str, int], torch.Tensor]:
    """:func:`removed_columns`, after checking that ``means`` has every mean they need, in the right shape (reads
    only shapes: the model's weights may still be on disk, ``meta``)."""
    layers = adapter.layers(model)
    columns = removed_columns(model, adapter, plan)
    for role, idx in columns:
        key = mean_key(role, idx)
        if key not in means:
            raise PrunekitError(
                f"prune.bias_compensation needs the mean activations of the o_proj / down_proj inputs, but the "
                f"scores lack '{key}': rescore with an activation-based criterion (activation, flap, wanda_sp)"
            )
        proj = projection(adapter, layers[idx], role)
        if means[key].shape != (proj.in_features,):
            raise PrunekitError(
                f"'{key}' has shape {tuple(means[key].shape)}, but {role} of layer {idx} has {proj.in_features} "
                "inputs; rerun the score stage for this model"
            )
    return columns


@torch.no_grad()
def compensate_layer(
    adapter: ModelAdapter,
    layer: Submodule,
    idx: int,
    columns: Mapping[tuple[str, int], torch.Tensor],
    means: Mapping[str, torch.Tensor],
) -> int:
    """Decoder layer ``idx`` (its weights loaded, not yet sliced) gets its zero biases and, on the projections with
    removed ``columns`` (from :func:`checked_columns`), b += W[:, removed] @ mean[removed]. Returns the biases added."""
    deltas = {}
    for role in CONSUMERS:
        cols = columns.get((role, idx))
        if cols is None:
            continue
        proj = projection(adapter, layer, role)
        mean = means[mean_key(role, idx)].to(proj.weight.device, torch.float64)
        cols = cols.to(proj.weight.device)
        deltas[role] = proj.weight.detach().to(torch.float64)[:, cols] @ mean[cols]
    added = add_layer_biases(adapter, layer)
    for role, delta in deltas.items():
        bias = projection(adapter, layer, role).bias
        bias.add_(delta.to(bias.dtype))
    return added


@torch.no_grad()
def compensate(model: CausalLM, adapter: ModelAdapter, plan: Plan, means: Mapping[str, torch.Tensor]) -> None:
    """b += W[:, removed] @ mean_x[removed] on o_proj / down_proj of every layer the plan prunes, in place.

    Call before slicing (the removed columns are still there). ``means`` maps ``aux.mean.<proj>.<layer>``
    to the (in_features,) input channel means, as the score stage saves them; extra keys are ignored.
    """
    # Everything is checked before the model changes, so an error leaves it untouched.
    columns = checked_columns(model, adapter, plan, means)
    for idx, layer in enumerate(adapter.layers(model)):
        compensate_layer(adapter, layer, idx, columns, means)
    mark_biases(model.config, adapter)
    log.info("bias compensation: folded removed-channel means into %d o_proj / down_proj biases", len(columns))
