"""Checks of params values against the registries (imports torch; run once at stage start-up)."""

from __future__ import annotations

from prunekit.errors import ParamsError, PrunekitError
from prunekit.pipeline.params import Params


def check_choices(params: Params) -> None:
    """Raise :class:`ParamsError` naming the key of any value that no registry knows."""
    from prunekit.data.sources import validate_spec
    from prunekit.models.sources import validate_source
    from prunekit.pruning.criteria import CRITERIA
    from prunekit.pruning.plan import ALLOCATIONS
    from prunekit.pruning.units import UNITS

    problems: list[str] = []

    def check(key: str, fn: object, *args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except PrunekitError as e:
            problems.append(f"params.yaml key '{key}': {e}")

    from prunekit.models.loading import check_device

    check("model.source", validate_source, params.model.source)
    check("model.device", check_device, params.model.device)
    for role in ("calibration", "training", "evaluation"):
        check(f"data.{role}", validate_spec, getattr(params.data, role), text_field=params.data.text_field)
    check("score.criterion", CRITERIA.get, params.score.criterion)
    check_units = getattr(CRITERIA.get(params.score.criterion), "check_units", None) if (
        params.score.criterion in CRITERIA) else None  # fmt: skip
    if check_units is not None and all(u in UNITS for u in params.prune.units):
        check("prune.units", check_units, list(params.prune.units))
    if params.score.base_dtype is not None and params.score.criterion in CRITERIA.names():
        if CRITERIA.get(params.score.criterion).base_gradients:
            problems.append(
                f"params.yaml key 'score.base_dtype': criterion '{params.score.criterion}' differentiates the "
                "base weights, which must stay in model.dtype; set score.base_dtype: null (or use lora or a "
                "forward-only criterion)"
            )
    if "seq_len" in params.score.lora.model_fields_set:
        problems.append(
            "params.yaml key 'score.lora.seq_len': the lora criterion trains on the calibration windows; "
            "set their length with calibrate.seq_len and remove this key"
        )
    check("prune.allocation", ALLOCATIONS.get, params.prune.allocation)
    if not params.prune.units:
        problems.append("params.yaml key 'prune.units': empty; choose from " + ", ".join(UNITS.names()))
    for i, unit in enumerate(params.prune.units):
        check(f"prune.units[{i}]", UNITS.get, unit)
    for unit, multiple in params.prune.round_to.items():
        check(f"prune.round_to.{unit}", UNITS.get, unit)
        if multiple < 1:
            problems.append(f"params.yaml key 'prune.round_to.{unit}': must be >= 1 (given: {multiple})")
    e = params.evaluate
    from prunekit.evaluation.datasets import check_local_file, check_ppl_name
    from prunekit.evaluation.zeroshot import check_local_dir, check_task

    if not e.perplexity:
        problems.append("params.yaml key 'evaluate.perplexity': empty; list at least one dataset, e.g. [default]")
    for i, name in enumerate(e.perplexity):
        check(f"evaluate.perplexity[{i}]", check_ppl_name, name)
    if not e.seq_lens or any(n < 2 for n in e.seq_lens):
        problems.append(f"params.yaml key 'evaluate.seq_lens': give lengths >= 2 (given: {list(e.seq_lens)})")
    for name, path in e.local_files.items():
        check(f"evaluate.local_files.{name}", check_local_file, name, path or None)
    for i, task in enumerate(e.zero_shot.tasks):
        check(f"evaluate.zero_shot.tasks[{i}]", check_task, task)
    if e.zero_shot.local_dir:
        check("evaluate.zero_shot.local_dir", check_local_dir, e.zero_shot.local_dir, e.zero_shot.tasks)
    if not e.speed.batch_sizes or any(b < 1 for b in e.speed.batch_sizes):
        problems.append(f"params.yaml key 'evaluate.speed.batch_sizes': give sizes >= 1 (given: {e.speed.batch_sizes})")
    from prunekit.pruning.schedules import SCHEDULES, Cut

    check("prune.schedule", SCHEDULES.get, params.prune.schedule)
    if params.prune.schedule in SCHEDULES:
        problems += SCHEDULES.get(params.prune.schedule).problems(Cut.of(params.prune, params.score.criterion))
    from prunekit.quant import SCHEMES

    for i, scheme in enumerate(params.search.choices):
        check(f"search.choices[{i}]", SCHEMES.get, scheme)
    known = [SCHEMES.get(c) for c in params.search.choices if c in SCHEMES]
    if params.search.budget_bits is not None and known and min(c.bits for c in known) > params.search.budget_bits:
        problems.append(
            f"params.yaml key 'search.budget_bits': {params.search.budget_bits} is below the narrowest scheme of "
            f"search.choices ({min(c.bits for c in known)} bits); raise it or add a narrower scheme (e.g. rtn2)"
        )
    if len(params.search.choices) < 2:
        problems.append("params.yaml key 'search.choices': list at least two schemes to choose between")
    if (params.search.budget_bits is None) == (params.search.budget_bytes is None):
        problems.append(
            "params.yaml keys 'search.budget_bits' / 'search.budget_bytes': set exactly one (the other null)"
        )
    units = set(params.prune.units)
    if "attn_query_head" in units and units & {"attn_qk_dim", "attn_vo_dim"}:
        # The planner counts each unit type's parameters separately; query heads and head dims share q rows
        # and o_proj columns, so their joint parameter count is a product it does not model yet.
        problems.append(
            "params.yaml key 'prune.units': attn_query_head cannot be combined with attn_qk_dim / attn_vo_dim; "
            "prune whole heads with attn_kv_group together with head dims instead"
        )
    if params.prune.bias_compensation:
        from prunekit.pruning.criteria.activations import ActivationCriterion

        name = params.score.criterion
        if name in CRITERIA and not isinstance(CRITERIA.get(name), ActivationCriterion):
            activation_based = [n for n, c in CRITERIA.items() if isinstance(c, ActivationCriterion)]
            problems.append(
                f"params.yaml key 'prune.bias_compensation': needs the mean activations an activation-based "
                f"criterion records; score.criterion is '{name}'. Choose one of {', '.join(activation_based)} "
                "or set prune.bias_compensation: false"
            )
    if problems:
        raise ParamsError("\n".join(problems))
