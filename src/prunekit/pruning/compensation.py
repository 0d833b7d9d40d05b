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

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import OUTPUT_BIAS, add_bias
from prunekit.pruning.criteria.activations import mean_key, projection
from prunekit.pruning.plan import Plan
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.base import CONSUMERS

log = logging.getLogger(__name__)


def removed_columns(model: nn.Module, adapter: ModelAdapter, plan: Plan) -> dict[tuple[str, int], torch.Tensor]:
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


def add_zero_biases(model: nn.Module, adapter: ModelAdapter) -> int:
    """Give o_proj and down_proj a bias (zeros where they had none), and what else the family's config needs to
    say so: with a stock switch (Llama) every q/k/v/o and gate/up/down projection; else ``output_bias`` in the
    config, which the pruned classes read. Returns how many biases were added."""
    stock = adapter.output_bias
    added = 0
    for layer in adapter.layers(model):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        attn_names = (adapter.q, adapter.k, adapter.v, adapter.o) if stock else (adapter.o,)
        mlp_names = (adapter.gate, adapter.up, adapter.down) if stock else (adapter.down,)
        for owner, names in ((attn, attn_names), (mlp, mlp_names)):
            added += sum(add_bias(getattr(owner, name)) for name in names)
    # The model classes build these biases from the config: keep it saying so, for save and reload.
    if stock:
        model.config.attention_bias = True
        model.config.mlp_bias = True
    else:
        setattr(model.config, OUTPUT_BIAS, True)
    return added


@torch.no_grad()
def compensate(model: nn.Module, adapter: ModelAdapter, plan: Plan, means: Mapping[str, torch.Tensor]) -> None:
    """b += W[:, removed] @ mean_x[removed] on o_proj / down_proj of every layer the plan prunes, in place.

    Call before slicing (the removed columns are still there). ``means`` maps ``aux.mean.<proj>.<layer>``
    to the (in_features,) input channel means, as the score stage saves them; extra keys are ignored.
    """
    layers = adapter.layers(model)
    deltas: dict[tuple[str, int], torch.Tensor] = {}
    # Everything is checked before the model changes, so an error leaves it untouched.
    for (role, idx), cols in removed_columns(model, adapter, plan).items():
        key = mean_key(role, idx)
        if key not in means:
            raise PrunekitError(
                f"prune.bias_compensation needs the mean activations of the o_proj / down_proj inputs, but the "
                f"scores lack '{key}': rescore with an activation-based criterion (activation, flap, wanda_sp)"
            )
        proj = projection(adapter, layers[idx], role)
        mean = means[key].to(proj.weight.device, torch.float64)
        if mean.shape != (proj.in_features,):
            raise PrunekitError(
                f"'{key}' has shape {tuple(mean.shape)}, but {role} of layer {idx} has {proj.in_features} inputs; "
                "rerun the score stage for this model"
            )
        cols = cols.to(proj.weight.device)
        deltas[(role, idx)] = proj.weight.detach().to(torch.float64)[:, cols] @ mean[cols]
    add_zero_biases(model, adapter)
    for (role, idx), delta in deltas.items():
        bias = projection(adapter, layers[idx], role).bias
        bias += delta.to(bias.dtype)
    log.info("bias compensation: folded removed-channel means into %d o_proj / down_proj biases", len(deltas))
