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

    from prunekit.pipeline.inputs import read_tensors
    from prunekit.pipeline.outputs import atomic_file
    from prunekit.pruning.scoring import ModelSource, QuantizedBase, score_directory
    from prunekit.quant.schemes import QuantSettings

    m, s = params.model, params.score
    calibration = read_tensors(calibration_file, "calibration tokens")["input_ids"]
    # A criterion without base-weight gradients may score on a lower-precision frozen base (score.base_dtype).
    source = ModelSource(
        model_dir, s.base_dtype or m.dtype, m.device, m.device_map, m.offload, m.offload_activations_mib
    )
    base = None
    if s.base_quant:
        base = QuantizedBase(s.base_quant, QuantSettings.from_params(params.quantize), tuple(s.lora.target_modules))
    scores = score_directory(source, s.criterion, list(params.prune.units), calibration, s.batch_size, params.seed,
                             s, base)  # fmt: skip
    with atomic_file(out) as tmp:
        save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"criterion": s.criterion})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--calibration", type=Path, dest="calibration_file", required=True)
    parser.add_argument("--out", type=Path, required=True, help="scores (.safetensors)")
    return run_stage("score", parser, score, argv)


if __name__ == "__main__":
    exit_after(main)
