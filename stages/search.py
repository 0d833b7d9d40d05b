"""Stage `search`: a per-layer quantization plan found by Bayesian optimisation under a memory budget (QPruner)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def search(
    params: Params, model_dir: Path, text: Path, plan: Path, trials: Path, metrics: Path, sensitivity: Path, plot: Path
) -> None:
    """QPruner's search: a scheme per layer group of ``model_dir`` under the ``search`` budget; the best plan
    (``plan``), every trial, the metrics, the per-group sensitivity and a plot."""
    from dataclasses import asdict

    from prunekit.data.tokens import mixed_windows, token_stream
    from prunekit.evaluation.plots import scatter_plot
    from prunekit.models.loading import load_model
    from prunekit.pipeline.inputs import read_document_groups
    from prunekit.pipeline.outputs import write_json
    from prunekit.quant.schemes import QuantSettings
    from prunekit.quant.search import search_model

    s, q, m = params.search, params.quantize, params.model
    model, tokenizer, adapter = load_model(model_dir, m.dtype, m.device, m.device_map)
    streams = [token_stream(tokenizer, docs) for docs in read_document_groups(text, "calibration")]
    held = mixed_windows(streams, s.samples, s.seq_len, params.seed)
    settings = QuantSettings.from_params(q)
    out = search_model(model, adapter, held, s, settings, params.seed)
    write_json(plan, {"schemes": out.plan, "settings": asdict(settings), "dtype": m.dtype})
    write_json(trials, out.trials)
    write_json(metrics, out.metrics)
    # Per group: a plot, not a metric (one column per layer would bury the headline numbers in `dvc metrics show`).
    write_json(sensitivity, out.sensitivity)
    rows = out.trials
    scatter_plot(
        plot,
        {"trials": ([r["trial"] for r in rows], [r["loss"] for r in rows])},
        {"memory (MiB)": ([r["quantized_bytes"] / 2**20 for r in rows], [r["loss"] for r in rows])},
        "mixed-precision search (loss of the held windows)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True, help="best plan (.json)")
    parser.add_argument("--trials", type=Path, required=True, help="every evaluated point (.json, DVC plots)")
    parser.add_argument("--metrics", type=Path, required=True, help="best and uniform plan (.json)")
    parser.add_argument(
        "--sensitivity", type=Path, required=True, help="loss increase of each group at the narrowest scheme"
    )
    parser.add_argument("--plot", type=Path, required=True, help="loss vs trial and vs memory (.png)")
    return run_stage("search", parser, search, argv)


if __name__ == "__main__":
    exit_after(main)
