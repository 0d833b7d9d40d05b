"""Stage `search`: a per-layer quantization plan found by Bayesian optimisation under a memory budget (QPruner)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def body(params: Params, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from prunekit.data.tokens import random_windows, token_stream
    from prunekit.evaluation.plots import scatter_plot
    from prunekit.models.loading import load_model
    from prunekit.pipeline.files import write_json
    from prunekit.pipeline.stageio import read_documents
    from prunekit.quant.schemes import QuantSettings
    from prunekit.quant.search import search_model

    s, q, m = params.search, params.quantize, params.model
    model, tokenizer, adapter = load_model(args.model, m.dtype, m.device, m.device_map)
    held = random_windows(token_stream(tokenizer, read_documents(Path(args.text), "calibration")), s.samples,
                          s.seq_len, params.seed)  # fmt: skip
    settings = QuantSettings(group_size=q.group_size, double_quant=q.double_quant, int8_threshold=q.int8_threshold)
    out = search_model(model, adapter, held, s, settings, params.seed)
    write_json(args.plan, {"schemes": out.plan, "settings": asdict(settings), "dtype": m.dtype})
    write_json(args.trials, out.trials)
    write_json(args.metrics, out.metrics)
    # Per group: a plot, not a metric (one column per layer would bury the headline numbers in `dvc metrics show`).
    write_json(args.sensitivity, out.sensitivity)
    rows = out.trials
    scatter_plot(
        Path(args.plot),
        {"trials": ([r["trial"] for r in rows], [r["loss"] for r in rows])},
        {"memory (MiB)": ([r["quantized_bytes"] / 2**20 for r in rows], [r["loss"] for r in rows])},
        "mixed-precision search (loss of the held windows)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--plan", required=True, help="best plan (.json)")
    parser.add_argument("--trials", required=True, help="every evaluated point (.json, DVC plots)")
    parser.add_argument("--metrics", required=True, help="best and uniform plan (.json)")
    parser.add_argument("--sensitivity", required=True, help="loss increase of each group at the narrowest scheme")
    parser.add_argument("--plot", required=True, help="loss vs trial and vs memory (.png)")
    return run_stage("search", parser, body, argv)


if __name__ == "__main__":
    exit_after(main)
