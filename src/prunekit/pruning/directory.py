"""Prune a model directory into another: the prune stage's one library call.

The model is held whole (``offload: none``; on the CPU for a one-shot cut, on its device for a schedule that
trains or an allocation search) or one decoder layer at a time (``offload: layerwise``: one-shot cuts,
:mod:`prunekit.pruning.layerwise`). The inputs are the score stage's scores, the calibration tokens and the texts;
a long schedule's or search's checkpoints go to ``state_dir`` under a fingerprint of what they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.pipeline.params import ScheduleParams, ScoreParams
from prunekit.pruning.schedules.base import Cut, PruneResult
from prunekit.pruning.scoring import ModelSource


@dataclass(frozen=True)
class PruneInputs:
    """The files a cut reads: scores (with their side data), calibration tokens, and the texts (the training share
    feeds the schedules' LoRA and ``prune.reconstruct_samples``)."""

    scores: Path
    calibration: Path
    text: Path


def prune_directory(
    source: ModelSource,
    inputs: PruneInputs,
    cut: Cut,
    schedule: str,
    out_dir: Path,
    record: dict[str, Any],
    seed: int = 0,
    settings: ScheduleParams | None = None,
    score_batch_size: int = 8,
    score_options: ScoreParams | None = None,
    state_dir: Path | None = None,
    state_params: dict[str, Any] | None = None,
) -> PruneResult:
    """Cut the model of ``source`` with ``schedule`` and write it, with ``record`` and its plan in its model record,
    to ``out_dir`` (complete or not at all). ``state_params``: the settings a checkpoint belongs to (with the
    inputs' digests, its fingerprint)."""
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.models.loading import load_model, load_tokenizer, model_shapes
    from prunekit.models.provenance import write_model_record
    from prunekit.models.saving import save_model
    from prunekit.pipeline.inputs import read_documents, read_tensors
    from prunekit.pipeline.outputs import atomic_dir
    from prunekit.pruning.allocations import ALLOCATIONS
    from prunekit.pruning.layerwise import prune_layerwise
    from prunekit.pruning.schedules import SCHEDULES, PruneJob, digest, fingerprint, prune_model, split_scores
    from prunekit.pruning.support import check_support

    # A schedule that trains, and an allocation search, run on the model's device and keep their progress.
    long_running = SCHEDULES.get(schedule).trains or ALLOCATIONS.get(cut.allocation).evaluates_candidates
    shapes, family = model_shapes(source.path)  # the family's and the model's refusals before any weight is read
    check_support(family, shapes, cut.units, cut.criterion, cut.bias_compensation, cut.reconstruct != "none")
    lw = None
    if source.offload == "layerwise":  # one decoder layer in memory at a time (one-shot cuts only: params)
        lw = LayerwiseModel(source.path, source.dtype, source.device)
        model, tokenizer, adapter = lw.model, load_tokenizer(source.path), lw.adapter
    else:
        model, tokenizer, adapter = load_model(source.path, source.dtype, source.device if long_running else "cpu")
    scores, side = split_scores(read_tensors(inputs.scores, "scores"))
    key = ""
    if long_running:  # the fingerprint of a checkpoint: the params and inputs it belongs to
        digests = [digest(f) for f in (inputs.scores, inputs.calibration, inputs.text, source.path)]
        key = fingerprint({"params": state_params or {}, "inputs": digests})
    job = PruneJob(
        model, tokenizer, adapter, scores, cut, seed, side, settings or ScheduleParams(),
        training_blocks=lambda seq_len: chunks(
            token_stream(tokenizer, read_documents(inputs.text, "training")), seq_len, "training"),
        calibration=lambda: read_tensors(inputs.calibration, "calibration tokens")["input_ids"],
        score_batch_size=score_batch_size, score_options=score_options or ScoreParams(), state_dir=state_dir,
        state_key=key, activations_mib=source.activations_mib,
    )  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        if lw is not None:
            result = prune_layerwise(lw, job, tmp)
        else:
            result = prune_model(job, schedule)
            save_model(result.model, adapter, tokenizer, tmp)
        write_model_record(tmp, {"plan": result.plan.to_json(), "params": record})
    return result
