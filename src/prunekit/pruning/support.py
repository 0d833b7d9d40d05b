"""What a model's family and shapes allow: the unit types, criterion and weight updates a run asks for.

The family declares what it refuses (:class:`prunekit.models.adapters.ModelAdapter`: ``refused_units``,
``refused_criteria``, ``compensation_refused``, ``reconstruction_refused``); a unit type declares what a model must
have for it (:meth:`prunekit.pruning.units.base.UnitType.refusal`: a KV group cannot go from a layer that has
one). :func:`check_support` asks both, reads only shapes (a model on the meta device will do) and refuses with one
line per problem, each naming its params.yaml key, before any work.
"""

from __future__ import annotations

from prunekit.errors import ParamsError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pruning.units import UNITS


def support_problems(
    adapter: ModelAdapter,
    model: CausalLM | None,
    units: list[str],
    criterion: str | None = None,
    compensation: bool = False,
    reconstruct: bool = False,
) -> list[str]:
    """One line per thing the run asks that this family (and, when given, this model) cannot do."""
    name = f"the {adapter.family} family"
    problems = []
    for i, unit in enumerate(units):
        why = adapter.refused_units.get(unit)
        if why is None and model is not None and unit in UNITS:
            why = UNITS.get(unit).refusal(adapter, model)
        if why is not None:
            problems.append(f"params.yaml key 'prune.units[{i}]': {name} cannot prune '{unit}': {why}")
    if criterion is not None and criterion in adapter.refused_criteria:
        problems.append(
            f"params.yaml key 'score.criterion': {name} cannot be scored by '{criterion}': "
            f"{adapter.refused_criteria[criterion]}"
        )
    if compensation and adapter.compensation_refused:
        problems.append(f"params.yaml key 'prune.bias_compensation': {name}: {adapter.compensation_refused}")
    if reconstruct and adapter.reconstruction_refused:
        problems.append(f"params.yaml key 'prune.reconstruct': {name}: {adapter.reconstruction_refused}")
    return problems


def check_support(
    adapter: ModelAdapter,
    model: CausalLM | None,
    units: list[str],
    criterion: str | None = None,
    compensation: bool = False,
    reconstruct: bool = False,
) -> None:
    """Raise :class:`ParamsError` listing :func:`support_problems` (nothing when all is supported)."""
    problems = support_problems(adapter, model, units, criterion, compensation, reconstruct)
    if problems:
        raise ParamsError("\n".join(problems))
