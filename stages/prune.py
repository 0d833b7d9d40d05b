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
    from prunekit.pipeline.outputs import write_json
    from prunekit.pruning.directory import PruneInputs, prune_directory
    from prunekit.pruning.schedules import Cut
    from prunekit.pruning.scoring import ModelSource

    p, m = params.prune, params.model
    source = ModelSource(model_dir, m.dtype, m.device, offload=m.offload, activations_mib=m.offload_activations_mib)
    result = prune_directory(
        source, PruneInputs(scores_file, calibration, text), Cut.of(p, params.score.criterion), p.schedule, out,
        record=params.model_dump(include={"seed", "score", "prune", "schedule"}), seed=params.seed,
        settings=params.schedule, score_batch_size=params.score.batch_size, score_options=params.score,
        state_dir=state, state_params=params.model_dump(include={"seed", "model", "score", "prune", "schedule"}),
    )  # fmt: skip
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
