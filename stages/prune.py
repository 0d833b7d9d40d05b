"""Stage `prune`: a plan from the scores (`prune.*`), the physically pruned model, and its metrics."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from prunekit.params import Params
from prunekit.runtime import exit_after, run_stage

log = logging.getLogger("prunekit.stages.prune")


def body(params: Params, args: argparse.Namespace) -> None:
    from prunekit.compensation import compensate
    from prunekit.fsutil import atomic_dir, write_json
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import write_model_record
    from prunekit.plan import PlanRequest, make_plan
    from prunekit.slicing import apply_plan, count_params, layouts, prunable_layers, save_model
    from prunekit.stageio import read_tensors

    p, m = params.prune, params.model
    # Schedules train LoRA, so they run where model.device says; one shot slices on the CPU.
    device = m.device if p.schedule != "oneshot" else "cpu"
    model, tokenizer, adapter = load_model(args.model, m.dtype, device)
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
    dense_names = {name for name, _ in model.named_parameters()}
    state = Path(args.state)
    schedule_log: list[dict] = []
    if p.schedule == "oneshot":
        state.mkdir(parents=True, exist_ok=True)  # the persisted state folder exists (empty) for every schedule
        plan = make_plan(scores, req, p.allocation, criterion=params.score.criterion)
        if p.bias_compensation:
            compensate(model, adapter, plan, tensors)  # before slicing: it reads the removed columns
        apply_plan(model, adapter, plan, mode="slice")
        params_before = plan.params_before
    else:
        model, plan, schedule_log, params_before = run_schedule(params, args, model, tokenizer, adapter, scores, req)
    actual = count_params(model)
    # Compensation adds biases the plan does not count (o_proj/down_proj, and zeros on q/k/v/gate/up).
    added = sum(t.numel() for name, t in model.named_parameters() if name not in dense_names)
    if p.schedule == "oneshot" and actual - added != plan.params_after:
        raise RuntimeError(f"sliced model has {actual - added} parameters, the plan expected {plan.params_after}")
    if added:
        log.info("bias compensation added %d parameters; the reported fraction counts them", added)
        plan.params_after = actual
    with atomic_dir(args.out) as tmp:
        save_model(model, adapter, tokenizer, tmp)
        meta = {"plan": plan.to_json(), "params": params.model_dump(include={"seed", "score", "prune", "schedule"})}
        write_model_record(tmp, meta)
    write_json(args.plan, plan.to_json())
    metrics = {
        "params_before": params_before,
        "params_after": actual,
        "achieved_fraction": round(1 - actual / params_before, 6),
        "target_fraction": p.target,
        "schedule": p.schedule,
    }
    if schedule_log:
        metrics["schedule_log"] = schedule_log
    write_json(args.metrics, metrics)
    if p.schedule != "oneshot":
        shutil.rmtree(state, ignore_errors=True)  # finished: nothing to resume
        state.mkdir(parents=True)


def run_schedule(params, args, model, tokenizer, adapter, scores, req):  # noqa: ANN001, ANN201
    """prune.schedule iterative / kshot (prunekit.schedules): (model, plan, log, parameters before)."""
    import dataclasses

    from prunekit.criteria import CRITERIA, ScoreRequest
    from prunekit.plan import Plan, PlanRequest, make_plan
    from prunekit.recovery import LoraSettings, check_targets
    from prunekit.schedules import IterativeSettings, KShotSettings, fingerprint, iterative_prune, kshot_prune
    from prunekit.slicing import count_params, layouts, prunable_layers
    from prunekit.stageio import read_documents, read_tensors
    from prunekit.tokens import chunks, token_stream

    p, sc = params.prune, params.schedule
    check_targets(model, list(sc.target_modules), "schedule.target_modules")
    docs = read_documents(Path(args.text), "training")
    blocks = chunks(token_stream(tokenizer, docs), sc.seq_len, "training")
    key = fingerprint(
        {
            "params": params.model_dump(include={"seed", "model", "score", "prune", "schedule"}),
            "inputs": [_digest(Path(args.scores)), _digest(Path(args.calibration)), _digest(Path(args.text))],
            "model": _digest(Path(args.model)),
        }
    )
    state = Path(args.state)
    before = count_params(model)
    units, layers = list(p.units), [lay.layer for lay in req.layouts]
    layers = sorted(set(layers))
    lora = LoraSettings.from_params(sc, sc.steps_per_shot, params.seed)  # kshot's; iterative replaces the steps
    if p.schedule == "iterative":
        from prunekit.criteria.lora import missing_targets
        from prunekit.errors import PrunekitError

        dense_layers = adapter.layers(model)
        targets = list(sc.target_modules)
        missing = sorted({t for i in layers for t in missing_targets(adapter, dense_layers[i], units, targets)})
        if missing:
            raise PrunekitError(
                f"schedule.target_modules {list(sc.target_modules)} miss {missing}: the iterative "
                "schedule scores every pruned module from its LoRA adapter"
            )
        cfg = IterativeSettings(
            prune_freq=sc.prune_freq,
            warmup=sc.warmup,
            cooldown=sc.cooldown,
            ema=sc.ema,
            checkpoint_every=sc.checkpoint_every,
            lora=dataclasses.replace(lora, steps=sc.iterative_steps),
        )
        model, plan, history = iterative_prune(
            model, adapter, blocks, req, units, layers, p.allocation, cfg, state, key
        )
        return model, plan, history, before

    calibration = read_tensors(Path(args.calibration), "calibration tokens")["input_ids"]
    criterion = CRITERIA.get(params.score.criterion)

    def score(m, a, shot):  # noqa: ANN001, ANN202
        n = len(a.layers(m))
        live = prunable_layers(n, p.skip_first, p.skip_last)
        sreq = ScoreRequest(units, live, calibration, params.score.batch_size, params.seed + shot,
                            params.score.model_dump())  # fmt: skip
        return criterion.score(m, a, sreq)

    def plan_for(m, a, s, fraction, original) -> Plan:  # noqa: ANN001
        live = prunable_layers(len(a.layers(m)), p.skip_first, p.skip_last)
        shot_req = PlanRequest.of_original(
            fraction, original, count_params(m), layouts(m, a, units, live), dict(p.round_to), p.tolerance
        )
        return make_plan({k: v for k, v in s.items() if not k.startswith("aux.")}, shot_req, p.allocation,
                         params.score.criterion)  # fmt: skip

    cfg = KShotSettings(target=p.target, shots=sc.shots, lora=lora)
    model, records = kshot_prune(model, adapter, blocks, scores, score, plan_for, cfg, tokenizer, state, key)
    final = Plan(keep={}, params_before=before, params_after=count_params(model), target=p.target,
                 allocation=p.allocation, criterion=params.score.criterion)  # fmt: skip
    return model, final, records, before


def _digest(path: Path) -> str:
    """sha256 of a file, or of every file in a folder (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--out", required=True, help="pruned model directory")
    parser.add_argument("--plan", required=True, help="plan (.json)")
    parser.add_argument("--metrics", required=True, help="prune metrics (.json)")
    parser.add_argument("--text", required=True, help="texts (training share: LoRA of the schedules)")
    parser.add_argument("--calibration", required=True, help="calibration tokens (kshot scoring)")
    parser.add_argument("--state", required=True, help="schedule checkpoints (persisted: a killed run resumes)")
    return run_stage("prune", parser, body, argv)


if __name__ == "__main__":
    exit_after(main)
