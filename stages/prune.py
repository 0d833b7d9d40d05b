"""Stage `prune`: cut the model to `prune.target` with `prune.schedule`; the pruned model, its plan, metrics."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def prune(params: Params, model_dir: Path, scores_file: Path, out: Path, plan_file: Path, metrics_file: Path,
          trials_file: Path, text: Path, calibration: Path, state: Path) -> None:  # fmt: skip
    """Cut ``model_dir`` to ``prune.target`` with ``prune.schedule`` from ``scores_file``; write the pruned model
    (``out``), the plan of what was kept (``plan_file``), the metrics, every candidate of an allocation search
    (``trials_file``; [] for the other allocations), and keep a long schedule's or search's progress in ``state``
    while it runs."""
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.models.loading import load_model, load_tokenizer
    from prunekit.models.provenance import write_model_record
    from prunekit.pipeline.files import atomic_dir, write_json
    from prunekit.pipeline.stageio import read_documents, read_tensors
    from prunekit.pruning.layerwise import prune_layerwise
    from prunekit.pruning.schedules import SCHEDULES, Cut, PruneJob, digest, fingerprint, prune_model, split_scores
    from prunekit.pruning.slicing import save_model

    p, m = params.prune, params.model
    # A schedule that trains, and an allocation search, run on model.device and keep their progress in ``state``.
    long_running = SCHEDULES.get(p.schedule).trains or p.allocation == "search"
    layerwise = m.offload == "layerwise"  # one decoder layer in memory at a time (one-shot cuts only: params)
    if layerwise:
        lw = LayerwiseModel(model_dir, m.dtype, m.device)
        model, tokenizer, adapter = lw.model, load_tokenizer(model_dir), lw.adapter
    else:
        model, tokenizer, adapter = load_model(model_dir, m.dtype, m.device if long_running else "cpu")
    scores, side = split_scores(read_tensors(scores_file, "scores"))
    if long_running:  # the fingerprint of a checkpoint: the params and inputs it belongs to
        inputs = [digest(f) for f in (scores_file, calibration, text, model_dir)]
        made_of = {
            "params": params.model_dump(include={"seed", "model", "score", "prune", "schedule"}),
            "inputs": inputs,
        }
    job = PruneJob(
        model, tokenizer, adapter, scores, Cut.of(p, params.score.criterion), params.seed, side, params.schedule,
        training_blocks=lambda seq_len: chunks(
            token_stream(tokenizer, read_documents(text, "training")), seq_len, "training"),
        calibration=lambda: read_tensors(calibration, "calibration tokens")["input_ids"],
        score_batch_size=params.score.batch_size, score_options=params.score.model_dump(),
        state_dir=state, state_key=fingerprint(made_of) if long_running else "",
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        if layerwise:
            result = prune_layerwise(lw, job, tmp, m.offload_activations_mib)
        else:
            result = prune_model(job, p.schedule)
            save_model(result.model, adapter, tokenizer, tmp)
        made_by = params.model_dump(include={"seed", "score", "prune", "schedule"})
        write_model_record(tmp, {"plan": result.plan.to_json(), "params": made_by})
    write_json(plan_file, result.plan.to_json())
    write_json(metrics_file, result.metrics(p.target, p.schedule))
    write_json(trials_file, result.trials)
    shutil.rmtree(state, ignore_errors=True)  # finished: nothing to resume; the folder stays (persisted)
    state.mkdir(parents=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--scores", type=Path, dest="scores_file", required=True)
    parser.add_argument("--out", type=Path, required=True, help="pruned model directory")
    parser.add_argument("--plan", type=Path, dest="plan_file", required=True, help="plan (.json)")
    parser.add_argument("--metrics", type=Path, dest="metrics_file", required=True, help="prune metrics (.json)")
    parser.add_argument(
        "--trials", type=Path, dest="trials_file", required=True, help="allocation search candidates (.json plot data)"
    )
    parser.add_argument("--text", type=Path, required=True, help="texts (training share: LoRA of the schedules)")
    parser.add_argument("--calibration", type=Path, required=True, help="calibration tokens (kshot scoring)")
    parser.add_argument("--state", type=Path, required=True, help="schedule checkpoints (persisted: resumable)")
    return run_stage("prune", parser, prune, argv)


if __name__ == "__main__":
    exit_after(main)
