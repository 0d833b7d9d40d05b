"""Checks of params values against the registries (imports torch; run once at stage start-up)."""

from __future__ import annotations

from collections.abc import Callable

from prunekit.errors import ParamsError, PrunekitError
from prunekit.pipeline.params import Params


class _Problems(list[str]):
    """The problems found so far, one line each, every line naming its params.yaml key."""

    def check(self, key: str, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``fn``; a :class:`PrunekitError` it raises becomes a problem of ``key``."""
        try:
            fn(*args, **kwargs)
        except PrunekitError as e:
            self.append(f"params.yaml key '{key}': {e}")

    def key(self, key: str, message: str) -> None:
        self.append(f"params.yaml key '{key}': {message}")


def check_choices(params: Params) -> None:
    """Raise :class:`ParamsError` naming the key of any value that no registry knows (every problem at once)."""
    problems = _Problems()
    for section in (_model_and_data, _score, _prune, _family, _evaluate, _search, _export):
        section(params, problems)
    if problems:
        raise ParamsError("\n".join(problems))


def _model_and_data(params: Params, problems: _Problems) -> None:
    from prunekit.data.sources import validate_spec
    from prunekit.models.loading import check_device
    from prunekit.models.sources import validate_source

    problems.check("model.source", validate_source, params.model.source)
    problems.check("model.device", check_device, params.model.device)
    if params.model.offload == "layerwise" and params.model.device_map:
        problems.key(
            "model.device_map",
            "model.offload: layerwise holds one layer at a time on model.device; set device_map: null "
            "(or offload: none to spread the whole model over the GPUs)",
        )
    for role in ("calibration", "training", "evaluation"):
        for spec in params.data.sources(role):
            problems.check(f"data.{role}", validate_spec, spec, text_field=params.data.text_field)


def layerwise_ok(criterion: object) -> bool:
    """Whether a criterion scores with one decoder layer in memory at a time (``model.offload: layerwise``):
    the per-layer criteria, and those that read only the layers' shapes (``random``)."""
    from prunekit.pruning.criteria.base import LayerCriterion

    return isinstance(criterion, LayerCriterion) or getattr(criterion, "shapes_only", False)


def layerwise_criteria() -> list[str]:
    from prunekit.pruning.criteria import CRITERIA

    return sorted(n for n, c in CRITERIA.items() if layerwise_ok(c))


def _score(params: Params, problems: _Problems) -> None:
    from prunekit.pruning.criteria import CRITERIA
    from prunekit.pruning.units import UNITS

    s = params.score
    problems.check("score.criterion", CRITERIA.get, s.criterion)
    criterion = CRITERIA.get(s.criterion) if s.criterion in CRITERIA else None
    check_units = getattr(criterion, "check_units", None)
    if check_units is not None and all(u in UNITS for u in params.prune.units):
        problems.check("prune.units", check_units, list(params.prune.units))
    if s.base_dtype is not None and criterion is not None and criterion.base_gradients:
        problems.key(
            "score.base_dtype",
            f"criterion '{s.criterion}' differentiates the base weights, which must stay in model.dtype; set "
            "score.base_dtype: null (or use lora or a forward-only criterion)",
        )
    if s.base_quant is not None:
        from prunekit.quant.schemes import usable_scheme

        problems.check("score.base_quant", usable_scheme, s.base_quant)
        if params.model.device_map:
            problems.key(
                "score.base_quant",
                "a quantized base is built layer by layer on model.device; set model.device_map: null",
            )
        if criterion is not None and not criterion.quantized_base:
            able = [n for n, c in CRITERIA.items() if c.quantized_base]
            problems.key(
                "score.base_quant",
                f"'{s.criterion}' reads the float weights or their gradients, so it cannot score on a quantized "
                f"frozen base; set score.base_quant: null or score.criterion to one of {', '.join(able)}",
            )
    if params.model.offload == "layerwise" and criterion is not None and not layerwise_ok(criterion):
        problems.key(
            "score.criterion",
            f"'{s.criterion}' needs the loss gradient of the whole network, which model.offload: layerwise cannot "
            f"give; use one of {', '.join(layerwise_criteria())} or set model.offload: none",
        )
    wide = [u for u in params.prune.units if u in UNITS and UNITS.get(u).model_wide]
    if params.model.offload == "layerwise" and wide:
        problems.key(
            "prune.units",
            f"'{wide[0]}' spans every layer, model.offload: layerwise scores one layer at a time; drop it or set "
            "model.offload: none",
        )


def _prune(params: Params, problems: _Problems) -> None:
    from prunekit.pruning.allocations import ALLOCATIONS
    from prunekit.pruning.criteria import CRITERIA
    from prunekit.pruning.criteria.activations import ActivationCriterion
    from prunekit.pruning.schedules import SCHEDULES, Cut
    from prunekit.pruning.units import UNITS

    p = params.prune
    problems.check("prune.allocation", ALLOCATIONS.get, p.allocation)
    if not p.units:
        problems.key("prune.units", "empty; choose from " + ", ".join(UNITS.names()))
    for i, unit in enumerate(p.units):
        problems.check(f"prune.units[{i}]", UNITS.get, unit)
    for unit, multiple in p.round_to.items():
        problems.check(f"prune.round_to.{unit}", UNITS.get, unit)
        if multiple < 1:
            problems.key(f"prune.round_to.{unit}", f"must be >= 1 (given: {multiple})")
    problems.check("prune.schedule", SCHEDULES.get, p.schedule)
    if p.schedule in SCHEDULES:
        problems += SCHEDULES.get(p.schedule).problems(Cut.of(p, params.score.criterion))
    known = [UNITS.get(u) for u in p.units if u in UNITS]
    allocation = ALLOCATIONS.get(p.allocation) if p.allocation in ALLOCATIONS else None
    if allocation is not None and allocation.evaluates_candidates:
        if not any(not (u.whole_layer or u.model_wide) for u in known):
            problems.key(
                "prune.allocation",
                f"'{p.allocation}' moves parameters between layers through width units; add one to prune.units "
                "(e.g. mlp_channel) or use allocation uniform to remove whole layers alone",
            )
        from prunekit.pruning.allocations.search import holdout_problem

        held = holdout_problem(params.calibrate.samples, p.search.holdout)
        if held:
            problems.key("prune.search.holdout", held)
        if params.model.offload == "layerwise":
            problems.key(
                "prune.allocation",
                f"'{p.allocation}' evaluates every candidate on the whole model, which model.offload: layerwise does "
                "not hold; use a rule allocation (uniform, global, ...) or model.offload: none",
            )
    schedule = SCHEDULES.get(p.schedule) if p.schedule in SCHEDULES else None
    if params.model.offload == "layerwise" and schedule is not None and not schedule.layer_by_layer:
        one_layer = [n for n, s in SCHEDULES.items() if s.layer_by_layer]
        problems.key(
            "prune.schedule",
            f"'{p.schedule}' trains or rescores the whole model between cuts, which model.offload: layerwise does "
            f"not hold; use schedule: {' | '.join(one_layer)} (a layer at a time) or model.offload: none",
        )
    if p.reconstruct != "none" and p.bias_compensation:
        problems.key("prune.reconstruct", "refits the biases too; set prune.bias_compensation: false with it")
    wide = [u.name for u in known if u.model_wide]
    if p.reconstruct != "none" and wide:
        problems.key("prune.reconstruct", f"cannot follow {wide[0]} (it changes every layer's hidden size)")
    if p.reconstruct != "none":
        from prunekit.pruning.reconstruction import RefitChoice

        windows = p.reconstruct_samples or params.calibrate.samples
        if allocation is not None and allocation.evaluates_candidates and p.reconstruct_samples is None:
            # a candidate is refit without the windows that judge the search
            from prunekit.pruning.holdout import held_out_mask

            windows -= int(held_out_mask(windows, p.search.holdout).sum())
        choice = RefitChoice(tuple(p.reconstruct_ridge), p.reconstruct_holdout)
        judged = p.reconstruct_standard_errors is not None
        problem = choice.problem(windows, judged)
        if problem:
            problems.key("prune.reconstruct_holdout", problem)
        if judged and params.model.offload == "layerwise":
            from prunekit.pruning.layerwise import UNJUDGED

            problems.key("prune.reconstruct_standard_errors", UNJUDGED)
    name = params.score.criterion
    if p.bias_compensation and name in CRITERIA and not isinstance(CRITERIA.get(name), ActivationCriterion):
        activation_based = [n for n, c in CRITERIA.items() if isinstance(c, ActivationCriterion)]
        problems.key(
            "prune.bias_compensation",
            f"needs the mean activations an activation-based criterion records; score.criterion is '{name}'. "
            f"Choose one of {', '.join(activation_based)} or set prune.bias_compensation: false",
        )


def _family(params: Params, problems: _Problems) -> None:
    """What the model's family refuses (its declarations), where the family is known before downloading."""
    from prunekit.models.families import family_of_model_type
    from prunekit.models.sources import source_model_type
    from prunekit.pruning.support import support_problems

    if any(line.startswith("params.yaml key 'model.source'") for line in problems):
        return  # the source itself is refused
    model_type = source_model_type(params.model.source)
    adapter = family_of_model_type(model_type) if model_type is not None else None
    if adapter is None:
        return  # known once the model is downloaded: the score and prune stages check it before any work
    p = params.prune
    problems += support_problems(
        adapter, None, list(p.units), params.score.criterion, p.bias_compensation, p.reconstruct != "none"
    )


def _evaluate(params: Params, problems: _Problems) -> None:
    from prunekit.evaluation.datasets import check_local_file, check_ppl_name
    from prunekit.evaluation.zeroshot import check_local_dir, check_task

    e = params.evaluate
    if not e.perplexity:
        problems.key("evaluate.perplexity", "empty; list at least one dataset, e.g. [default]")
    for i, name in enumerate(e.perplexity):
        problems.check(f"evaluate.perplexity[{i}]", check_ppl_name, name)
    if not e.seq_lens or any(n < 2 for n in e.seq_lens):
        problems.key("evaluate.seq_lens", f"give lengths >= 2 (given: {list(e.seq_lens)})")
    for name, path in e.local_files.items():
        problems.check(f"evaluate.local_files.{name}", check_local_file, name, path or None)
    for i, task in enumerate(e.zero_shot.tasks):
        problems.check(f"evaluate.zero_shot.tasks[{i}]", check_task, task)
    if e.zero_shot.tasks and params.model.offload == "layerwise":
        problems.key(
            "evaluate.zero_shot.tasks",
            "lm-eval runs the whole model, which model.offload: layerwise does not hold; set tasks: [] "
            "(perplexity is measured a layer at a time) or model.offload: none",
        )
    if e.zero_shot.local_dir:
        problems.check("evaluate.zero_shot.local_dir", check_local_dir, e.zero_shot.local_dir, e.zero_shot.tasks)
    if not e.speed.batch_sizes or any(b < 1 for b in e.speed.batch_sizes):
        problems.key("evaluate.speed.batch_sizes", f"give sizes >= 1 (given: {e.speed.batch_sizes})")


def _search(params: Params, problems: _Problems) -> None:
    from prunekit.quant import SCHEMES
    from prunekit.quant.schemes import usable_scheme

    s = params.search
    for i, scheme in enumerate(s.choices):
        problems.check(f"search.choices[{i}]", usable_scheme, scheme)
    known = [SCHEMES.get(c) for c in s.choices if c in SCHEMES]
    if s.budget_bits is not None and known and min(c.bits for c in known) > s.budget_bits:
        problems.key(
            "search.budget_bits",
            f"{s.budget_bits} is below the narrowest scheme of search.choices ({min(c.bits for c in known)} bits); "
            "raise it or add a narrower scheme (e.g. rtn2)",
        )
    if len(s.choices) < 2:
        problems.key("search.choices", "list at least two schemes to choose between")
    if s.embeddings:
        from prunekit.quant.plan import check_embedding_scheme

        for i, c in enumerate(s.choices):
            if c in SCHEMES:
                problems.check(f"search.choices[{i}]", check_embedding_scheme, SCHEMES.get(c), "the token embedding")
    if (s.budget_bits is None) == (s.budget_bytes is None):
        problems.append(
            "params.yaml keys 'search.budget_bits' / 'search.budget_bytes': set exactly one (the other null)"
        )


def _export(params: Params, problems: _Problems) -> None:
    from prunekit.quant.gguf_types import check_encoder

    e = params.export
    if e.types != "plan":
        problems.check("export.types", check_encoder, e.types, "GGUF type (or plan)")
    if e.embedding is not None:
        problems.check("export.embedding", check_encoder, e.embedding)
    if e.output is not None:
        problems.check("export.output", check_encoder, e.output)
    problems.check("export.unplanned", check_encoder, e.unplanned)
