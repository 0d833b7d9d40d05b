"""Stage `score`: an importance score for every unit of `prune.units` in every layer (`score.criterion`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def score(params: Params, model_dir: Path, calibration_file: Path, out: Path) -> None:
    """Score every unit of ``prune.units`` in every layer of ``model_dir`` with ``score.criterion`` on the
    windows in ``calibration_file``; the scores (and side data such as channel means) go to ``out`` (.safetensors)."""
    from safetensors.torch import save_file

    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.models.loading import load_model
    from prunekit.pipeline.files import atomic_file
    from prunekit.pipeline.stageio import read_tensors
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.criteria.base import LayerCriterion

    m = params.model
    criterion = CRITERIA.get(params.score.criterion)
    calibration = read_tensors(calibration_file, "calibration tokens")["input_ids"]
    # A criterion without base-weight gradients may score on a lower-precision frozen base (score.base_dtype).
    dtype = params.score.base_dtype or m.dtype
    layerwise = None
    if params.score.base_quant:
        # A frozen quantized base (lora): each layer is quantized as it is read, the float model is never whole.
        lw = LayerwiseModel(model_dir, dtype, m.device)
        model, adapter = quantized_base(lw, params), lw.adapter
    elif m.offload == "layerwise":
        layerwise = LayerwiseModel(model_dir, dtype, m.device)
        model, adapter = layerwise.model, layerwise.adapter  # weights on the meta device until a layer runs
    else:
        model, _, adapter = load_model(model_dir, dtype, m.device, m.device_map)
    req = ScoreRequest(
        units=list(params.prune.units),
        layers=list(range(len(adapter.layers(model)))),
        calibration=calibration,
        batch_size=params.score.batch_size,
        seed=params.seed,
        options=params.score.model_dump(),
    )
    if isinstance(criterion, LayerCriterion):
        # Side data rides along: the channel means for FLAP bias compensation at prune time (aux.mean.* keys).
        if layerwise is not None:
            scores, aux = criterion.score_layerwise(layerwise, adapter, req, m.offload_activations_mib)
        else:
            scores, aux = criterion.score_with_aux(model, adapter, req)
        scores = {**scores, **aux}
    else:  # validation admits only shape-only criteria (random) with model.offload: layerwise
        scores = criterion.score(model, adapter, req)
    with atomic_file(out) as tmp:
        save_file(
            {k: v.contiguous() for k, v in scores.items()},
            str(tmp),
            metadata={"criterion": params.score.criterion},
        )


def quantized_base(lw: object, params: Params) -> object:
    """The model of ``lw`` (a LayerwiseModel) with the lora targets of every layer in ``score.base_quant``."""
    from prunekit.quant.apply import quantize_linears
    from prunekit.quant.schemes import SCHEMES, QuantSettings

    settings = QuantSettings.from_params(params.quantize)
    scheme = SCHEMES.get(params.score.base_quant)
    targets = list(params.score.lora.target_modules)
    return lw.whole(lambda _idx, layer: quantize_linears(layer, targets, scheme, settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--calibration", type=Path, dest="calibration_file", required=True)
    parser.add_argument("--out", type=Path, required=True, help="scores (.safetensors)")
    return run_stage("score", parser, score, argv)


if __name__ == "__main__":
    exit_after(main)
