"""Stage `prune`: cut the model to `prune.target` with `prune.schedule`; the pruned model, its plan, metrics."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def body(params: Params, args: argparse.Namespace) -> None:
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import write_model_record
    from prunekit.pipeline.files import atomic_dir, write_json
    from prunekit.pipeline.stageio import read_documents, read_tensors
    from prunekit.pruning.schedules import SCHEDULES, Cut, PruneJob, digest, fingerprint, prune_model, split_scores
    from prunekit.pruning.slicing import save_model

    p, m = params.prune, params.model
    trains = SCHEDULES.get(p.schedule).trains  # a schedule that trains runs on model.device and checkpoints
    model, tokenizer, adapter = load_model(args.model, m.dtype, m.device if trains else "cpu")
    scores, side = split_scores(read_tensors(Path(args.scores), "scores"))
    if trains:  # the fingerprint of a checkpoint: the params and inputs it belongs to
        inputs = [digest(Path(f)) for f in (args.scores, args.calibration, args.text, args.model)]
        made_of = {
            "params": params.model_dump(include={"seed", "model", "score", "prune", "schedule"}),
            "inputs": inputs,
        }
    job = PruneJob(
        model, tokenizer, adapter, scores, Cut.of(p, params.score.criterion), params.seed, side, params.schedule,
        training_blocks=lambda seq_len: chunks(
            token_stream(tokenizer, read_documents(Path(args.text), "training")), seq_len, "training"),
        calibration=lambda: read_tensors(Path(args.calibration), "calibration tokens")["input_ids"],
        score_batch_size=params.score.batch_size, score_options=params.score.model_dump(),
        state_dir=Path(args.state), state_key=fingerprint(made_of) if trains else "",
    )  # fmt: skip
    result = prune_model(job, p.schedule)
    with atomic_dir(args.out) as tmp:
        save_model(result.model, adapter, tokenizer, tmp)
        made_by = params.model_dump(include={"seed", "score", "prune", "schedule"})
        write_model_record(tmp, {"plan": result.plan.to_json(), "params": made_by})
    write_json(args.plan, result.plan.to_json())
    metrics = {
        "params_before": result.plan.params_before,
        "params_after": result.plan.params_after,
        "achieved_fraction": round(result.plan.achieved, 6),
        "target_fraction": p.target,
        "schedule": p.schedule,
    }
    write_json(args.metrics, metrics | ({"schedule_log": result.log} if result.log else {}))
    shutil.rmtree(args.state, ignore_errors=True)  # finished: nothing to resume; the folder stays (persisted)
    Path(args.state).mkdir(parents=True)


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
