"""Pruning plans: which units of which layers to keep, decided from scores (plain data, saved as JSON).

Planning is separate from applying: :func:`make_plan` reads only scores and unit sizes, and
:mod:`prunekit.slicing` applies the result to a model.
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


def _removed(counts: dict[tuple[str, int], int], layouts: list[UnitLayout]) -> int:
    return sum((lay.count - counts[(lay.unit, lay.layer)]) * lay.params_per_unit for lay in layouts)


@ALLOCATIONS.register("uniform")
def uniform(scores: dict[str, torch.Tensor], req: PlanRequest) -> dict[tuple[str, int], int]:
    """The same ratio in every pruned layer (LLM-Pruner).

    The ratio r* that would remove ``target`` of all parameters if every unit type could be cut exactly is
    applied to the coarse unit types (those whose rounding step holds the most parameters, e.g. KV groups);
    the finest unit type (MLP channels) then takes the ratio that brings the total to the target, so that
    coarse rounding does not move the achieved fraction by whole KV groups. Every layer still gets the same
    ratio per unit type.
    """
    del scores  # uniform allocation ignores scores; they choose which units within a layer
    units = sorted({lay.unit for lay in req.layouts})
    step = {u: max(lay.params_per_unit * req.round_to.get(u, 1) for lay in req.layouts if lay.unit == u) for u in units}
    fine = min(units, key=lambda u: (step[u], u))
    prunable = sum(lay.count * lay.params_per_unit for lay in req.layouts)
    want = req.target * req.total_params
    r_star = min(want / prunable, 1.0) if prunable else 0.0
    counts = {(lay.unit, lay.layer): lay.kept(r_star, req.round_to.get(lay.unit, 1)) for lay in req.layouts}
    fine_layouts = [lay for lay in req.layouts if lay.unit == fine]
    coarse_removed = _removed(counts, [lay for lay in req.layouts if lay.unit != fine])
    fine_prunable = sum(lay.count * lay.params_per_unit for lay in fine_layouts)
    r_fine = min(max((want - coarse_removed) / fine_prunable, 0.0), 1.0) if fine_prunable else 0.0
    for lay in fine_layouts:
        counts[(lay.unit, lay.layer)] = lay.kept(r_fine, req.round_to.get(lay.unit, 1))
    return counts


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
    keep: dict[str, dict[int, list[int]]] = {}
    ratios: dict[str, dict[int, float]] = {}
    for lay in req.layouts:
        k = counts[(lay.unit, lay.layer)]
        keep.setdefault(lay.unit, {})[lay.layer] = top_k(scores[f"{lay.unit}.{lay.layer}"], k, lay.groups)
        ratios.setdefault(lay.unit, {})[lay.layer] = 1.0 - k / lay.count
    removed = _removed(counts, req.layouts)
    plan = Plan(
        keep=keep,
        params_before=req.total_params,
        params_after=req.total_params - removed,
        target=req.target,
        allocation=allocation,
        criterion=criterion,
        layer_ratios=ratios,
    )
    log.info("plan: remove %.2f%% of parameters (target %.2f%%)", 100 * plan.achieved, 100 * req.target)
    if not math.isclose(plan.achieved, req.target, abs_tol=req.tolerance):
        raise PrunekitError(
            f"prune.target={req.target} cannot be met within prune.tolerance={req.tolerance}: the closest plan "
            f"removes {plan.achieved:.4f} of all parameters. Prune more layers (lower prune.skip_first / "
            f"prune.skip_last), add unit types to prune.units, lower prune.round_to, or widen prune.tolerance."
        )
    return plan
