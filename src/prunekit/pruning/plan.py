"""Pruning plans: which units of which layers to keep (plain data, saved as JSON), and what they remove.

Planning is separate from applying: an allocation (:mod:`prunekit.pruning.allocations`) decides how many units
each layer keeps from the scores and unit sizes alone, and :mod:`prunekit.pruning.slicing` applies the plan to a
model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prunekit.errors import PrunekitError

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
    # One layout for the whole model (``hidden_channel``): its ``tensors`` name every parameter it slices in the
    # model, those of decoder layer i as ``layers.<i>.<path in the layer>`` (:func:`layer_tensor`), and its kept
    # share multiplies into the other unit types' shares of the same tensors.
    model_wide: bool = False

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
    # ``allocation: search``: evaluates candidate allocations on a model (prunekit.pruning.allocations.search);
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


def finest_unit(layouts: list[UnitLayout], round_to: dict[str, int]) -> str | None:
    """The unit type of ``layouts`` whose rounding step (parameters per unit times ``round_to``, the largest over its
    layouts) holds the fewest parameters; ties to the first name. None: no layouts."""
    step: dict[str, int] = {}
    for lay in layouts:
        step[lay.unit] = max(step.get(lay.unit, 0), lay.params_per_unit * round_to.get(lay.unit, 1))
    return min(step, key=lambda u: (step[u], u)) if step else None


def layout_key(lay: UnitLayout) -> str:
    return f"{lay.unit}.{lay.layer}"


def layer_tensor(layer: int, path: str) -> str:
    """How a model-wide layout names the parameter ``path`` of decoder layer ``layer``."""
    return f"{LAYER_TENSORS}{layer}.{path}"


LAYER_TENSORS = "layers."
Share = tuple[int, int]  # (kept units, units) of one layout: the fraction of a tensor's sliced axis that stays


def removed_params(counts: dict[tuple[str, int], int], layouts: list[UnitLayout]) -> int:
    """Parameters that keeping ``counts[(unit, layer)]`` units removes, every parameter counted once.

    A model-wide layout (hidden channels) slices tensors in every layer and outside them; in each tensor its
    kept share multiplies the shares of the per-layer types that slice it too (they slice other axes), and a
    removed layer takes its tensors with it."""
    by_layer: dict[int, list[UnitLayout]] = {}
    wide: dict[str, dict[str, tuple[int, list[Share]]]] = {}  # layer tensor or outside name -> size, shares
    for lay in layouts:
        if not lay.model_wide:
            by_layer.setdefault(lay.layer, []).append(lay)
            continue
        share = (counts[(lay.unit, lay.layer)], lay.count)
        for name, n in _tensors(lay, [lay]):
            inside = name.startswith(LAYER_TENSORS)  # "layers.<i>.<path>": decoder layer i's; else outside them
            layer, _, path = name.removeprefix(LAYER_TENSORS).partition(".") if inside else ("", "", name)
            wide.setdefault(layer, {}).setdefault(path, (n, []))[1].append(share)
    removed = sum(_layer_removed(lays, counts, wide.pop(str(i), {})) for i, lays in by_layer.items())
    for tensors in wide.values():  # layers no per-layer type prunes, and the tensors outside the layers
        removed += sum(_sliced(n, shares) for n, shares in tensors.values())
    return removed


def _sliced(n: int, shares: list[Share]) -> int:
    """Parameters removed from a tensor of ``n`` whose axes keep the ``shares``."""
    num, den = n, 1
    for kept, count in shares:
        num, den = num * kept, den * count
    return n - (2 * num + den) // (2 * den)  # exact whenever the shares tile the tensor (they do)


def _layer_removed(
    lays: list[UnitLayout], counts: dict[tuple[str, int], int], wide: dict[str, tuple[int, list[Share]]]
) -> int:
    """Parameters removed from one layer: all of them if a whole-layer unit goes; else, for every tensor the
    unit types slice, its size times one minus the product of their kept shares (a tensor sliced by several types,
    or by a parent type and its children, counted once; ``wide``: the model-wide types' shares of this layer's
    tensors, by path)."""
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
        shares = [(kept[unit], count[unit]) for unit in slicers[name]]
        removed += _sliced(n, shares + (wide[name][1] if name in wide else []))
    for name, (n, shares) in wide.items():
        if name not in size:
            removed += _sliced(n, shares)
    return removed


def _tensors(lay: UnitLayout, lays: list[UnitLayout]) -> tuple[tuple[str, int], ...]:
    """The tensors ``lay``'s units slice; a layout that names none owns ``count * params_per_unit`` parameters,
    of which those of child layouts (``parent`` = its unit, also naming none) are theirs."""
    if lay.tensors:
        return lay.tensors
    own = lay.count * lay.params_per_unit
    own -= sum(c.count * c.params_per_unit for c in lays if c.parent == lay.unit and not c.tensors)
    return ((f"{lay.unit}.units", own),)


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
