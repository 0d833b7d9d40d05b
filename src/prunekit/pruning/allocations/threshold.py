"""``global`` and ``global_weighted``: one threshold across layers and unit types, so layers end with different
widths (LLM-Pruner's global pruning; FLAP's adaptive structure)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from prunekit.pruning.allocations.base import ALLOCATIONS, Allocation, Counts
from prunekit.pruning.plan import PlanRequest, UnitLayout, layout_key, removed_params

log = logging.getLogger(__name__)


def _keep_whole_in_removed_layers(counts: dict[tuple[str, int], int], layouts: list[UnitLayout]) -> None:
    """Width units of removed layers are left whole: the layer takes them with it (the plan reads clearly)."""
    gone = {lay.layer for lay in layouts if lay.whole_layer and counts[(lay.unit, lay.layer)] < lay.count}
    for lay in layouts:
        if lay.layer in gone and not lay.whole_layer:
            counts[(lay.unit, lay.layer)] = lay.count


def _by_unit(layouts: list[UnitLayout]) -> dict[str, list[UnitLayout]]:
    out: dict[str, list[UnitLayout]] = {}
    for lay in layouts:
        out.setdefault(lay.unit, []).append(lay)
    return out


def _sum_normalised(s: torch.Tensor) -> torch.Tensor:
    """``s / s.sum()``; all-zero scores give every unit the same share."""
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / s.numel())


def _standardised(s: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` (sample std, as FLAP's ``torch.std``); constant scores give zeros."""
    if s.numel() < 2:
        return torch.zeros_like(s)
    std = s.std()
    return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)


def _keys(
    scores: dict[str, torch.Tensor], layouts: list[UnitLayout], normalise: Callable[[torch.Tensor], torch.Tensor]
) -> dict[tuple[str, int], torch.Tensor]:
    """Comparable keys: width units normalised within their (unit type, layer), whole layers across layers."""
    keys: dict[tuple[str, int], torch.Tensor] = {}
    for unit, lays in _by_unit(layouts).items():
        if lays[0].whole_layer:
            s = torch.cat([scores[layout_key(lay)].reshape(1) for lay in lays]).double()
            for lay, v in zip(lays, normalise(s)):
                keys[(unit, lay.layer)] = v.reshape(1)
        else:
            for lay in lays:
                keys[(unit, lay.layer)] = normalise(scores[layout_key(lay)].double())
    return keys


def _threshold_counts(
    keys: dict[tuple[str, int], torch.Tensor], req: PlanRequest, tau: float
) -> dict[tuple[str, int], int]:
    """Kept units when every unit whose key is below ``tau`` goes, rounded to ``round_to`` (per group),
    keeping at least one ``round_to`` per group; whole layers go exactly when below."""
    counts = {}
    for lay in req.layouts:
        below = int((keys[(lay.unit, lay.layer)] < tau).sum())
        if lay.whole_layer:
            counts[(lay.unit, lay.layer)] = lay.count - below
        else:
            counts[(lay.unit, lay.layer)] = lay.kept(below / lay.count, req.round_to.get(lay.unit, 1))
    return counts


def _threshold_allocation(
    name: str, keys: dict[tuple[str, int], torch.Tensor], req: PlanRequest
) -> dict[tuple[str, int], int]:
    """One threshold on ``keys`` for all layers and unit types, bisected so the removed parameters come
    closest to the target (removal grows with the threshold, so bisection over the sorted keys is exact)."""
    want = req.target * req.total_params
    values = torch.unique(torch.cat([k.reshape(-1) for k in keys.values()])).tolist()  # ascending
    cuts = [*values, math.inf]  # cut i removes the units whose key is below cuts[i]; cut 0 removes none

    def removed(i: int) -> int:
        return removed_params(_threshold_counts(keys, req, cuts[i]), req.layouts)

    lo, hi = 0, len(cuts) - 1  # smallest cut removing at least ``want`` (or the last one)
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(mid) >= want:
            hi = mid
        else:
            lo = mid + 1
    best = lo
    if lo > 0 and want - removed(lo - 1) <= removed(lo) - want:
        best = lo - 1  # the cut just below is at least as close: prefer removing less
    counts = _threshold_counts(keys, req, cuts[best])
    _keep_whole_in_removed_layers(counts, req.layouts)
    log.info(
        "%s allocation: threshold %.6g removes %.4f of all parameters (target %.4f)",
        name,
        cuts[best],
        removed_params(counts, req.layouts) / req.total_params,
        req.target,
    )
    return counts


class GlobalThreshold(Allocation):
    """One threshold across layers on per-layer sum-normalised scores (LLM-Pruner's global pruning).

    Normalisation: each layer's scores of one unit type are divided by their sum (every layer of a unit
    type then carries importance 1), and multiplied by the number of units of that type per layer, so that
    1 means "as important as the layer's average unit". With the dense widths every layer of a type has
    the same count, so this is one threshold per unit type on sum-normalised scores, ``t_u = tau / n_u``,
    all derived from one ``tau`` shared by the unit types (torch-pruning's global pruning with a mean
    normaliser). Whole layers (``layer``) are normalised across the pruned layers instead (a single score
    per layer divided by its own sum would always be 1). Scores are expected non-negative, as the built-in
    criteria's are; a layer whose scores are all zero counts as uniform.

    Units below the threshold are removed; each layer's kept count is rounded to ``prune.round_to`` (per
    group for grouped units: the same number of query heads in every KV group) and keeps at least one
    ``round_to`` per group. The threshold is bisected so the removed parameters come closest to the target;
    layers end with different widths.
    """

    name = "global"

    def counts(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Counts:
        return _threshold_allocation(self.name, _keys(scores, req.layouts, _sum_normalised_times_count), req)


def _sum_normalised_times_count(s: torch.Tensor) -> torch.Tensor:
    """Sum-normalised scores times their count: 1 = the average unit of the layer (or of the layers)."""
    return _sum_normalised(s) * s.numel()


class GlobalWeighted(Allocation):
    """FLAP's adaptive structure (AL-AM): standardised scores compared across layers and unit types.

    As FLAP's code (``standarlization`` over axis 1 of the layers x channels score matrix): each layer's
    scores of one unit type are standardised, ``z = (s - mean) / std`` (sample std), over that layer's units
    of that type; whole layers (``layer``) are standardised across the pruned layers. All units of all
    layers and unit types are then ranked by ``z`` and the lowest are removed until the removed parameters
    reach the target: every unit weighs its own parameter count (FLAP's ``compression_weight``, 512/3 for
    a LLaMA-7B head against an MLP channel). Here that is one threshold on ``z``, bisected so the removed
    parameters (each counted once) come closest to the target, with kept counts rounded to
    ``prune.round_to`` per group and at least one ``round_to`` per group, as for ``global``.
    """

    name = "global_weighted"

    def counts(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Counts:
        return _threshold_allocation(self.name, _keys(scores, req.layouts, _standardised), req)


ALLOCATIONS.register(GlobalThreshold.name)(GlobalThreshold())
ALLOCATIONS.register(GlobalWeighted.name)(GlobalWeighted())
