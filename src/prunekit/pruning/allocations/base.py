"""The allocation contract: how many units of each type every layer keeps, from scores and unit sizes."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

import torch

from prunekit.errors import PrunekitError
from prunekit.pruning.plan import Plan, PlanRequest, plan_of_counts
from prunekit.registry import Registry

log = logging.getLogger(__name__)

Counts = dict[tuple[str, int], int]  # (unit type, layer) -> units kept


class Allocation(ABC):
    """A rule for how many units of each type every layer keeps (``prune.allocation``)."""

    name = ""
    # Whether it evaluates candidate plans on the model itself (on the calibration windows, in memory): it then
    # needs the request's searcher (the schedules give one), the whole model (not ``model.offload: layerwise``) and
    # per-layer unit types, and it keeps its progress in the prune stage's state folder (a killed run resumes).
    evaluates_candidates = False
    # Whether every pruned layer keeps the same widths (a runtime that reads one width for all layers, as
    # llama.cpp's graphs of some families do, runs the result when no layer is skipped).
    same_widths = False

    @abstractmethod
    def counts(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Counts:
        """Units kept per (unit type, layer) of ``req``'s layouts."""


ALLOCATIONS: Registry[Allocation] = Registry("allocation")


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
    counts = ALLOCATIONS.get(allocation).counts(scores, req)
    plan = plan_of_counts(scores, req, counts, allocation, criterion)
    log.info("plan: remove %.2f%% of parameters (target %.2f%%)", 100 * plan.achieved, 100 * req.target)
    if not math.isclose(plan.achieved, req.target, abs_tol=req.tolerance):
        raise PrunekitError(
            f"prune.target={req.target} cannot be met within prune.tolerance={req.tolerance}: the closest plan "
            f"removes {plan.achieved:.4f} of all parameters. Prune more layers (lower prune.skip_first / "
            f"prune.skip_last), add unit types to prune.units, lower prune.round_to, or widen prune.tolerance."
        )
    return plan
