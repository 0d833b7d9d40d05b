"""Stage `evaluate`: perplexity protocols, lm-eval zero-shot accuracy, size, cost and speed of one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def evaluate(params: Params, model_dir: Path, text: Path, out: Path, made_from: str,
             dense_metrics: Path | None = None) -> None:  # fmt: skip
    """Perplexity protocols, zero-shot accuracy, size, cost and speed of ``model_dir`` (plain or quantized),
    written to ``out`` with the digest of the params it was made with (``made_from``: dense, pruned, recovered or
    quantized); ``dense_metrics`` (optional) gives a quantized model its size ratio to the dense one."""
    from prunekit.data.sources import data_name
    from prunekit.evaluation.made_with import made_with
    from prunekit.evaluation.model_metrics import evaluate_layerwise, evaluate_model
    from prunekit.models.families import adapter_for
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import library_versions
    from prunekit.models.size import count_params, weight_bytes
    from prunekit.pipeline.inputs import read_documents
    from prunekit.pipeline.outputs import read_json, write_json
    from prunekit.quant.realise import logical_param_count, plan_cost_of_model, quantized_weight_bytes
    from prunekit.quant.saving import is_quantized_dir, load_quantized

    m = params.model
    quantized = is_quantized_dir(model_dir)
    rows = read_documents(text, "evaluation")
    name = data_name(params.data.evaluation)
    if m.offload == "layerwise" and not quantized:
        # One decoder layer in memory at a time: perplexity and size (zero-shot is refused by validation).
        metrics = evaluate_layerwise(
            model_dir, m.dtype, m.device, m.offload_activations_mib, params.evaluate, rows, name
        )
    else:
        if quantized:
            model, tokenizer, plan = load_quantized(model_dir, m.device)
            adapter = adapter_for(model.config)
        else:
            model, tokenizer, adapter = load_model(model_dir, m.dtype, m.device, m.device_map)
        metrics = {"params": count_params(model), "weight_bytes": weight_bytes(model)}
        if quantized:
            n_params, n_adapter = logical_param_count(model)
            base = model.get_base_model() if n_adapter else model
            metrics["params"], metrics["adapter_params"] = n_params, n_adapter
            metrics["weight_bytes"] = quantized_weight_bytes(base)
            metrics["avg_bits"] = round(plan_cost_of_model(base, plan), 4)
            if dense_metrics:
                dense = read_json(dense_metrics, "dense model metrics")
                metrics["bytes_vs_dense_16bit"] = round(metrics["weight_bytes"] / (2 * dense["params"]), 4)
        metrics |= evaluate_model(model, tokenizer, adapter, params.evaluate, params.seed, rows, name)
    metrics["made_with"] = made_with(params.model_dump(mode="json"), made_from)
    metrics["versions"] = library_versions()  # what produced these numbers (not in the hashed model directories)
    write_json(out, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="metrics (.json)")
    parser.add_argument("--made-from", required=True, choices=["dense", "pruned", "recovered", "quantized"],
                        help="which model of the pipeline this is (its params digest goes in the metrics)")  # fmt: skip
    parser.add_argument(
        "--dense-metrics", type=Path, help="the dense model's metrics (.json): bytes ratio to its 16-bit size"
    )
    return run_stage("evaluate", parser, evaluate, argv)


if __name__ == "__main__":
    exit_after(main)
