"""``uniform``: the same ratio in every pruned layer (LLM-Pruner); whole layers by score (ShortGPT)."""

from __future__ import annotations

import torch

from prunekit.pruning.allocations.base import ALLOCATIONS, Allocation, Counts
from prunekit.pruning.plan import PlanRequest, UnitLayout, finest_unit, layout_key, removed_params


def _lowest_layers(
    scores: dict[str, torch.Tensor], whole: list[UnitLayout], want: float, fit: bool
) -> dict[tuple[str, int], int]:
    """Remove the lowest-scored whole layers: as many as fit in ``want`` (``fit``), else the number whose
    removal comes closest to ``want`` (ties: fewer). Equal scores: the later layer goes first, as in top_k."""
    order = sorted(whole, key=lambda lay: (float(scores[layout_key(lay)][0]), -lay.layer))
    prefix = [0]
    for lay in order:
        prefix.append(prefix[-1] + lay.params_per_unit)
    n = max(i for i, removed in enumerate(prefix) if removed <= want)
    if not fit and n < len(order) and prefix[n + 1] - want < want - prefix[n]:
        n += 1
    return {(lay.unit, lay.layer): 0 if i < n else lay.count for i, lay in enumerate(order)}


def _uniform_widths(layouts: list[UnitLayout], want: float, round_to: dict[str, int]) -> dict[tuple[str, int], int]:
    """Kept width units at one ratio per unit type: r* for the coarse types, the gap-closing one for the finest."""
    if not layouts:
        return {}
    fine = finest_unit(layouts, round_to)
    prunable = sum(lay.count * lay.params_per_unit for lay in layouts)
    r_star = min(max(want, 0.0) / prunable, 1.0) if prunable else 0.0
    counts = {(lay.unit, lay.layer): lay.kept(r_star, round_to.get(lay.unit, 1)) for lay in layouts}
    fine_layouts = [lay for lay in layouts if lay.unit == fine]
    # What the finest type can still remove given the coarse choice (nested types: inside kept parents).
    for lay in fine_layouts:
        counts[(lay.unit, lay.layer)] = lay.count
    coarse_removed = removed_params(counts, layouts)
    fine_prunable = (
        removed_params({**counts, **{(lay.unit, lay.layer): 0 for lay in fine_layouts}}, layouts) - coarse_removed
    )
    r_fine = min(max((want - coarse_removed) / fine_prunable, 0.0), 1.0) if fine_prunable else 0.0
    for lay in fine_layouts:
        counts[(lay.unit, lay.layer)] = lay.kept(r_fine, round_to.get(lay.unit, 1))
    return counts


class Uniform(Allocation):
    """The same ratio in every pruned layer (LLM-Pruner); whole layers by score (ShortGPT).

    The ratio r* that would remove ``target`` of all parameters if every unit type could be cut exactly is
    applied to the coarse unit types (those whose rounding step holds the most parameters, e.g. KV groups);
    the finest unit type (MLP channels) then takes the ratio that brings the total to the target, so that
    coarse rounding does not move the achieved fraction by whole KV groups. Every layer still gets the same
    ratio per unit type.

    Whole layers (``layer``) have no ratio: the lowest-scored ones are removed first. With width units in
    the plan as well, as many layers go as fit in the target and the width units close the remaining gap
    uniformly in the remaining layers; with layers alone, the number of layers that comes closest.
    """

    name = "uniform"
    same_widths = True

    def counts(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Counts:
        want = req.target * req.total_params
        whole = [lay for lay in req.layouts if lay.whole_layer]
        has_width = len(whole) < len(req.layouts)
        counts = _lowest_layers(scores, whole, want, fit=has_width) if whole else {}
        gone = {lay.layer for lay in whole if counts[(lay.unit, lay.layer)] == 0}
        width = [lay for lay in req.layouts if not lay.whole_layer and lay.layer not in gone]
        counts.update(_uniform_widths(width, want - removed_params(counts, whole), req.round_to))
        for lay in req.layouts:  # width units of removed layers: left whole, the layer takes them with it
            counts.setdefault((lay.unit, lay.layer), lay.count)
        return counts


ALLOCATIONS.register(Uniform.name)(Uniform())
