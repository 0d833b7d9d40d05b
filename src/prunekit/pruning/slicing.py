"""Apply a plan to a model: physically (a smaller dense model) or as a mask (zeros, same shapes); the sliced
model's config then describes its widths (:mod:`prunekit.models.saving` saves it)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.saving import config_for
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.plan import Plan, UnitLayout, layer_tensor
from prunekit.pruning.units import UNITS

log = logging.getLogger(__name__)


def prunable_layers(n_layers: int, skip_first: int, skip_last: int) -> list[int]:
    """Indices of the layers that may be pruned, first and last ones left whole."""
    if skip_first + skip_last >= n_layers:
        raise PrunekitError(
            f"prune.skip_first={skip_first} + prune.skip_last={skip_last} leaves no layer of {n_layers} to prune"
        )
    return list(range(skip_first, n_layers - skip_last))


def layouts(model: CausalLM, adapter: ModelAdapter, units: list[str], layers: list[int]) -> list[UnitLayout]:
    """The unit counts and sizes the planner needs, for the given unit types and layers.

    A model-wide unit type (``hidden_channel``) gets one layout, named by layer 0 (whatever ``layers``), for
    the whole model, listing every parameter it slices (those in decoder layers by layer and path): a removed
    hidden channel shrinks every projection of every layer, so the planner multiplies its kept share into the
    other types' shares of the same tensors instead of adding removals (:func:`prunekit.pruning.plan.removed_params`).
    """
    wide = [name for name in units if UNITS.get(name).model_wide]
    out = [_wide_layout(model, adapter, name) for name in wide]  # model-wide: one layout, named by layer 0
    out += [_layout(model, adapter, name, idx) for idx in layers for name in units if name not in wide]
    return out


def _layout(model: CausalLM, adapter: ModelAdapter, name: str, idx: int) -> UnitLayout:
    ut, layer = UNITS.get(name), adapter.layers(model)[idx]
    tensors: tuple[tuple[str, int], ...] = ()
    if not ut.whole_layer:  # its members are the whole layer
        paths = dict.fromkeys(m.path for m in ut.members(adapter, layer))
        tensors = tuple((path, layer.get_parameter(path).numel()) for path in paths)
    return UnitLayout(
        name,
        idx,
        ut.count(adapter, layer),
        ut.params_per_unit(adapter, layer),
        ut.groups(adapter, layer),
        parent=ut.parent,
        whole_layer=ut.whole_layer,
        tensors=tensors,
    )


def _wide_layout(model: CausalLM, adapter: ModelAdapter, name: str) -> UnitLayout:
    """The one layout of a model-wide unit type: its tensors named by decoder layer and path inside the layers
    (as the per-layer layouts name theirs), by their model names outside."""
    ut, first = UNITS.get(name), adapter.layers(model)[0]
    where = {id(p): layer_tensor(i, path) for i, lay in enumerate(adapter.layers(model))
             for path, p in lay.named_parameters()}  # fmt: skip
    where |= {id(p): path for path, p in model.named_parameters() if id(p) not in where}
    params = {m.path: first.get_parameter(m.path) for m in ut.members(adapter, first)}
    tensors = tuple(dict.fromkeys((where[id(p)], p.numel()) for p in params.values()))
    return UnitLayout(name, 0, ut.count(adapter, first), ut.params_per_unit(adapter, first), ut.groups(adapter, first),
                      parent=ut.parent, tensors=tensors, model_wide=True)  # fmt: skip


@torch.no_grad()
def apply_plan(model: CausalLM, adapter: ModelAdapter, plan: Plan, mode: str = "slice") -> nn.Module:
    """Keep only the plan's units, in place. ``mode="mask"`` zeroes the others instead of removing them.

    Every index in a plan numbers the units of the model the plan was made for (the dense model). Unit
    types are applied in ascending ``UnitType.order`` so that each type's indices are still valid when its
    turn comes, whatever the order of ``plan.keep``: units inside a parent unit first (query heads before
    the KV groups that contain them: every group loses the same query heads, so the KV groups stay whole
    and keep their numbering), then the other width units, then whole layers (width indices are given per
    dense layer index; removing layers renumbers them). All indices are checked before anything changes.
    """
    if mode not in ("slice", "mask"):
        raise ValueError(f"mode must be 'slice' or 'mask', got {mode!r}")
    units = sorted(plan.keep, key=lambda u: (UNITS.get(u).order, u))
    for unit in units:
        _check_keep(model, adapter, unit, plan.keep[unit])
    for unit in units:
        UNITS.get(unit).apply_model(model, adapter, plan.keep[unit], mode)
    if mode == "slice":
        model.config = config_for(model, adapter)
    return model


def check_plan_fits(model: CausalLM, adapter: ModelAdapter, plan: Plan) -> None:
    """PrunekitError unless every unit and layer the plan names exists in ``model`` (reads only shapes)."""
    for unit in plan.keep:
        _check_keep(model, adapter, unit, plan.keep[unit])


@torch.no_grad()
def apply_plan_to_layer(adapter: ModelAdapter, layer: Submodule, plan: Plan, idx: int, mode: str) -> nn.Module:
    """What :func:`apply_plan` does to decoder layer ``idx`` (dense numbering), for a model held one layer at a
    time. A layer the plan removes is zeroed in ``mode="mask"`` (the identity) and left as it is in ``"slice"``:
    the caller drops it (:func:`prunekit.pruning.units.layers.remove_layers` on the whole model)."""
    for unit in sorted(plan.keep, key=lambda u: (UNITS.get(u).order, u)):
        ut, per_layer = UNITS.get(unit), plan.keep[unit]
        if idx not in per_layer:
            continue
        if ut.model_wide:
            raise PrunekitError(f"unit type '{unit}' spans the whole model and cannot be applied one layer at a time")
        if ut.whole_layer:
            if mode == "mask" and not per_layer[idx]:
                ut.apply(adapter, layer, torch.zeros(0, dtype=torch.long), mode)
            continue
        ut.apply(adapter, layer, torch.tensor(sorted(per_layer[idx]), dtype=torch.long), mode)
        if mode == "slice":
            adapter.refresh_layer(layer)
    return layer


def _check_keep(model: CausalLM, adapter: ModelAdapter, unit: str, per_layer: dict[int, list[int]]) -> None:
    """PrunekitError unless ``per_layer`` names existing layers and units and keeps equal counts per group."""
    ut = UNITS.get(unit)
    layers = adapter.layers(model)
    for idx, keep in per_layer.items():
        if not 0 <= idx < len(layers):
            raise PrunekitError(f"plan names layer {idx} but the model has {len(layers)} layers")
        n = ut.count(adapter, layers[idx])
        if keep and (max(keep) >= n or min(keep) < 0):
            raise PrunekitError(f"plan keeps {unit} {max(keep)} of layer {idx}, which has only {n}")
        groups = ut.groups(adapter, layers[idx])
        if groups > 1:
            per_group = torch.bincount(torch.tensor(keep, dtype=torch.long) // (n // groups), minlength=groups)
            if (per_group != per_group[0]).any() or per_group[0] == 0:
                raise PrunekitError(
                    f"plan keeps {per_group.tolist()} {unit} units in the {groups} groups of layer {idx}; every "
                    f"group must keep the same number, at least one (plans from make_plan do)"
                )
