"""Stage `prune`: a plan from the scores (`prune.*`), the physically pruned model, and its metrics."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from prunekit.params import Params
from prunekit.runtime import run_stage

log = logging.getLogger("prunekit.stages.prune")


def body(params: Params, args: argparse.Namespace) -> None:
    from prunekit.compensation import compensate
    from prunekit.fsutil import atomic_dir, write_json
    from prunekit.models.loading import load_model
    from prunekit.plan import PlanRequest, make_plan
    from prunekit.slicing import apply_plan, count_params, layouts, prunable_layers, save_model
    from prunekit.stageio import read_tensors

    p, m = params.prune, params.model
    model, tokenizer, adapter = load_model(args.model, m.dtype, "cpu")
    tensors = read_tensors(Path(args.scores), "scores")
    # "<unit>.<layer>" keys are scores; "aux.*" keys are side data (channel means for bias compensation).
    scores = {k: v for k, v in tensors.items() if not k.startswith("aux.")}
    layers = prunable_layers(len(adapter.layers(model)), p.skip_first, p.skip_last)
    req = PlanRequest(
        target=p.target,
        total_params=count_params(model),
        layouts=layouts(model, adapter, list(p.units), layers),
        round_to=dict(p.round_to),
        tolerance=p.tolerance,
    )
    plan = make_plan(scores, req, p.allocation, criterion=params.score.criterion)
    dense_names = {name for name, _ in model.named_parameters()}
    if p.bias_compensation:
        compensate(model, adapter, plan, tensors)  # before slicing: it reads the removed columns
    apply_plan(model, adapter, plan, mode="slice")
    actual = count_params(model)
    # Compensation adds biases the plan does not count (o_proj/down_proj, and zeros on q/k/v/gate/up).
    added = sum(t.numel() for name, t in model.named_parameters() if name not in dense_names)
    if actual - added != plan.params_after:
        raise RuntimeError(f"sliced model has {actual - added} parameters, the plan expected {plan.params_after}")
    if added:
        log.info("bias compensation added %d parameters; the reported fraction counts them", added)
        plan.params_after = actual
    with atomic_dir(args.out) as tmp:
        save_model(model, adapter, tokenizer, tmp)
        meta = {"plan": plan.to_json(), "params": params.model_dump(include={"seed", "score", "prune"})}
        (tmp / "prunekit.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_json(args.plan, plan.to_json())
    write_json(
        args.metrics,
        {
            "params_before": plan.params_before,
            "params_after": plan.params_after,
            "achieved_fraction": round(plan.achieved, 6),
            "target_fraction": plan.target,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--out", required=True, help="pruned model directory")
    parser.add_argument("--plan", required=True, help="plan (.json)")
    parser.add_argument("--metrics", required=True, help="prune metrics (.json)")
    return run_stage("prune", parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())
