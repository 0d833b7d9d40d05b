"""Pruning plans: which units of which layers to keep, decided from scores (plain data, saved as JSON).

Planning is separate from applying: :func:`make_plan` reads only scores and unit sizes, and
:mod:`prunekit.pruning.slicing` applies the result to a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitLayout:
    """What the planner needs to know of one unit type in one layer."""

    unit: str
    layer: int
    count: int
    params_per_unit: int
    # Units form ``groups`` equal contiguous groups that must all keep the same number of units
    # (e.g. query heads inside KV groups); 1 = no constraint.
    groups: int = 1
    # Each group lies inside one unit of the type ``parent`` ("" = none; query heads inside KV groups):
    # a removed parent unit takes its group with it, so only removals inside kept parent units count.
    parent: str = ""
    # A whole decoder layer (``count`` 1, ``params_per_unit`` = all its parameters): chosen globally by
    # score and kept 0 or 1 times; once removed, the other unit types of its layer count for nothing.
    whole_layer: bool = False
    # The parameters the units are slices of, (name, size): a tensor several unit types slice (q_proj: KV groups,
    # query heads and q/k dims) keeps its size times the product of their kept shares, each type indexing its own
    # factor of the sliced axis. Empty: the units' own ``count * params_per_unit`` parameters (a parent's
    # including its children's, which its removed units take with them).
    tensors: tuple[tuple[str, int], ...] = ()

    def kept(self, ratio: float, multiple: int) -> int:
        """Units kept at ``ratio``: the same count in every group, rounded to ``multiple`` per group."""
        return self.groups * kept_count(self.count // self.groups, ratio, multiple)


@dataclass
class Plan:
    """Kept unit indices per unit type and layer, with the numbers that describe the result."""

    keep: dict[str, dict[int, list[int]]]
    params_before: int
    params_after: int
    target: float
    allocation: str
    criterion: str = ""
    layer_ratios: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["keep"] = {u: {str(i): k for i, k in layers.items()} for u, layers in self.keep.items()}
        data["layer_ratios"] = {u: {str(i): r for i, r in d.items()} for u, d in self.layer_ratios.items()}
        data["achieved"] = self.achieved
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        try:
            return cls(
                keep={u: {int(i): list(k) for i, k in layers.items()} for u, layers in data["keep"].items()},
                params_before=int(data["params_before"]),
                params_after=int(data["params_after"]),
                target=float(data["target"]),
                allocation=str(data["allocation"]),
                criterion=str(data.get("criterion", "")),
                layer_ratios={
                    u: {int(i): float(r) for i, r in d.items()} for u, d in data.get("layer_ratios", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PrunekitError(f"plan JSON is malformed ({e!r}); rerun the prune stage") from e


@dataclass(frozen=True)
class PlanRequest:
    """Everything an allocation needs besides the scores."""

    target: float
    total_params: int
    layouts: list[UnitLayout]
    round_to: dict[str, int]
    tolerance: float
    # ``allocation: search``: evaluates candidate allocations on a model (prunekit.pruning.allocation_search);
    # given by the schedule that cuts, None for the allocations that read scores only.
    search: Any = None

    @classmethod
    def of_original(
        cls,
        fraction: float,
        original: int,
        current: int,
        layouts: list[UnitLayout],
        round_to: dict[str, int],
        tolerance: float,
    ) -> PlanRequest:
        """Cut a model that already lost some parameters (``current`` of ``original``) down to ``1 - fraction``
        of the original; ``fraction`` and ``tolerance`` are on fractions of the original model and become
        fractions of the current one (schedules that cut in several rounds)."""
        return cls(1 - original * (1 - fraction) / current, current, layouts, round_to, tolerance * original / current)


def kept_count(count: int, ratio: float, multiple: int) -> int:
    """Units kept when removing ``ratio`` of ``count``, rounded to ``multiple``, at least one multiple."""
    multiple = max(1, min(multiple, count))
    kept = round(count * (1.0 - ratio) / multiple) * multiple
    return int(min(count, max(multiple, kept)))


def top_k(scores: torch.Tensor, k: int, groups: int = 1) -> list[int]:
    """Indices of the ``k`` highest scores, sorted; ties go to the lower index (stable).

    With ``groups`` > 1 the scores form that many equal contiguous groups and each keeps its own top
    ``k / groups``.
    """
    if k % groups:
        raise ValueError(f"cannot keep {k} units evenly in {groups} groups")
    size, per = scores.numel() // groups, k // groups
    kept: list[int] = []
    for g in range(groups):
        order = torch.argsort(scores[g * size : (g + 1) * size].double(), descending=True, stable=True)
        kept.extend(int(i) + g * size for i in order[:per])
    return sorted(kept)


ALLOCATIONS: Registry[Callable[[dict[str, torch.Tensor], PlanRequest], dict[tuple[str, int], int]]] = Registry(
    "allocation"
)


def _key(lay: UnitLayout) -> str:
    return f"{lay.unit}.{lay.layer}"


def removed_params(counts: dict[tuple[str, int], int], layouts: list[UnitLayout]) -> int:
    """Parameters that keeping ``counts[(unit, layer)]`` units removes, every parameter counted once."""
    by_layer: dict[int, list[UnitLayout]] = {}
    for lay in layouts:
        by_layer.setdefault(lay.layer, []).append(lay)
    return sum(_layer_removed(lays, counts) for lays in by_layer.values())


def _layer_removed(lays: list[UnitLayout], counts: dict[tuple[str, int], int]) -> int:
    """Parameters removed from one layer: all of them if a whole-layer unit goes; else, for every tensor the
    unit types slice, its size times one minus the product of their kept shares (a tensor sliced by several types,
    or by a parent type and its children, counted once)."""
    kept = {lay.unit: counts[(lay.unit, lay.layer)] for lay in lays}
    for lay in lays:
        if lay.whole_layer and kept[lay.unit] < lay.count:
            return (lay.count - kept[lay.unit]) * lay.params_per_unit
    width = [lay for lay in lays if not lay.whole_layer]
    size: dict[str, int] = {}
    slicers: dict[str, set[str]] = {}
    for lay in width:
        for name, n in _tensors(lay, width):
            size[name] = n
            slicers.setdefault(name, set()).add(lay.unit)
            if any(p.unit == lay.parent for p in width):  # a removed parent unit takes the child's slices
                slicers[name].add(lay.parent)
    count = {lay.unit: lay.count for lay in width}
    removed = 0
    for name, n in size.items():
        num, den = n, 1
        for unit in slicers[name]:
            num, den = num * kept[unit], den * count[unit]
        removed += n - (2 * num + den) // (2 * den)  # exact whenever the shares tile the tensor (they do)
    return removed


def _tensors(lay: UnitLayout, lays: list[UnitLayout]) -> tuple[tuple[str, int], ...]:
    """The tensors ``lay``'s units slice; a layout that names none owns ``count * params_per_unit`` parameters,
    of which those of child layouts (``parent`` = its unit, also naming none) are theirs."""
    if lay.tensors:
        return lay.tensors
    own = lay.count * lay.params_per_unit
    own -= sum(c.count * c.params_per_unit for c in lays if c.parent == lay.unit and not c.tensors)
    return ((f"{lay.unit}.units", own),)


def _keep_whole_in_removed_layers(counts: dict[tuple[str, int], int], layouts: list[UnitLayout]) -> None:
    """Width units of removed layers are left whole: the layer takes them with it (the plan reads clearly)."""
    gone = {lay.layer for lay in layouts if lay.whole_layer and counts[(lay.unit, lay.layer)] < lay.count}
    for lay in layouts:
        if lay.layer in gone and not lay.whole_layer:
            counts[(lay.unit, lay.layer)] = lay.count


def _lowest_layers(
    scores: dict[str, torch.Tensor], whole: list[UnitLayout], want: float, fit: bool
) -> dict[tuple[str, int], int]:
    """Remove the lowest-scored whole layers: as many as fit in ``want`` (``fit``), else the number whose
    removal comes closest to ``want`` (ties: fewer). Equal scores: the later layer goes first, as in top_k."""
    order = sorted(whole, key=lambda lay: (float(scores[_key(lay)][0]), -lay.layer))
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
    units = sorted({lay.unit for lay in layouts})
    step = {u: max(lay.params_per_unit * round_to.get(u, 1) for lay in layouts if lay.unit == u) for u in units}
    fine = min(units, key=lambda u: (step[u], u))
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


@ALLOCATIONS.register("uniform")
def uniform(scores: dict[str, torch.Tensor], req: PlanRequest) -> dict[tuple[str, int], int]:
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
            s = torch.cat([scores[_key(lay)].reshape(1) for lay in lays]).double()
            for lay, v in zip(lays, normalise(s)):
                keys[(unit, lay.layer)] = v.reshape(1)
        else:
            for lay in lays:
                keys[(unit, lay.layer)] = normalise(scores[_key(lay)].double())
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


@ALLOCATIONS.register("global")
def global_threshold(scores: dict[str, torch.Tensor], req: PlanRequest) -> dict[tuple[str, int], int]:
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
    return _threshold_allocation("global", _keys(scores, req.layouts, _sum_normalised_times_count), req)


def _sum_normalised_times_count(s: torch.Tensor) -> torch.Tensor:
    """Sum-normalised scores times their count: 1 = the average unit of the layer (or of the layers)."""
    return _sum_normalised(s) * s.numel()


@ALLOCATIONS.register("global_weighted")
def global_weighted(scores: dict[str, torch.Tensor], req: PlanRequest) -> dict[tuple[str, int], int]:
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
    return _threshold_allocation("global_weighted", _keys(scores, req.layouts, _standardised), req)


def make_plan(
    scores: dict[str, torch.Tensor],
    req: PlanRequest,
    allocation: str,
    criterion: str = "",
) -> Plan:
    """Choose kept units: the allocation decides how many per layer, the scores which ones.

    ``scores`` maps ``"<unit>.<layer>"`` to a (count,) tensor; higher means more important.
    Raises :class:`PrunekitError` if the achieved fraction misses the target by more than the tolerance.
    """
    if not req.layouts:
        raise PrunekitError("nothing to prune: no layer is left after prune.skip_first / prune.skip_last")
    for lay in req.layouts:
        s = scores.get(f"{lay.unit}.{lay.layer}")
        if s is None or s.numel() != lay.count:
            raise PrunekitError(
                f"scores for {lay.unit} in layer {lay.layer} are missing or have the wrong size "
                f"(expected {lay.count}); rerun the score stage for this model"
            )
        if not torch.isfinite(s).all():
            raise PrunekitError(f"scores for {lay.unit} in layer {lay.layer} contain NaN or inf")
    counts = ALLOCATIONS.get(allocation)(scores, req)
    plan = plan_of_counts(scores, req, counts, allocation, criterion)
    log.info("plan: remove %.2f%% of parameters (target %.2f%%)", 100 * plan.achieved, 100 * req.target)
    if not math.isclose(plan.achieved, req.target, abs_tol=req.tolerance):
        raise PrunekitError(
            f"prune.target={req.target} cannot be met within prune.tolerance={req.tolerance}: the closest plan "
            f"removes {plan.achieved:.4f} of all parameters. Prune more layers (lower prune.skip_first / "
            f"prune.skip_last), add unit types to prune.units, lower prune.round_to, or widen prune.tolerance."
        )
    return plan


def plan_of_counts(
    scores: dict[str, torch.Tensor],
    req: PlanRequest,
    counts: dict[tuple[str, int], int],
    allocation: str,
    criterion: str = "",
) -> Plan:
    """The plan that keeps ``counts[(unit, layer)]`` units of each layout, the highest-scored ones."""
    keep: dict[str, dict[int, list[int]]] = {}
    ratios: dict[str, dict[int, float]] = {}
    for lay in req.layouts:
        k = counts[(lay.unit, lay.layer)]
        keep.setdefault(lay.unit, {})[lay.layer] = top_k(scores[f"{lay.unit}.{lay.layer}"], k, lay.groups)
        ratios.setdefault(lay.unit, {})[lay.layer] = 1.0 - k / lay.count
    removed = removed_params(counts, req.layouts)
    return Plan(
        keep=keep,
        params_before=req.total_params,
        params_after=req.total_params - removed,
        target=req.target,
        allocation=allocation,
        criterion=criterion,
        layer_ratios=ratios,
    )


from prunekit.pruning import allocation_search  # noqa: E402, F401  (registers allocation "search")
