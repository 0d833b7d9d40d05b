"""Stage `search`: a per-layer quantization plan found by Bayesian optimisation under a memory budget (QPruner)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prunekit.params import Params
from prunekit.runtime import exit_after, run_stage

log = logging.getLogger("prunekit.stages.search")


def body(params: Params, args: argparse.Namespace) -> None:
    from dataclasses import asdict

    import torch

    from prunekit.fsutil import write_json
    from prunekit.lmloss import lm_loss
    from prunekit.models.loading import load_model
    from prunekit.plots import scatter_plot
    from prunekit.quant.apply import fake_quantized, quant_targets
    from prunekit.quant.schemes import QuantSettings
    from prunekit.quant.search import Budget, build_space, search
    from prunekit.stageio import read_documents
    from prunekit.tokens import random_windows, token_stream

    s, q, m = params.search, params.quantize, params.model
    budget = Budget(bits=s.budget_bits, bytes=s.budget_bytes)
    model, tokenizer, adapter = load_model(args.model, m.dtype, m.device, m.device_map)
    stream = token_stream(tokenizer, read_documents(Path(args.text), "calibration"))
    held = random_windows(stream, s.samples, s.seq_len, params.seed)
    settings = QuantSettings(group_size=q.group_size, double_quant=q.double_quant, int8_threshold=q.int8_threshold)
    device = next(model.parameters()).device

    targets = quant_targets(model, adapter)
    dtype_bytes = next(model.parameters()).element_size()
    cache_need = sum(t.numel for t in targets) * len(s.choices) * dtype_bytes / 2**20
    cache: dict | None = {} if cache_need <= s.cache_mib else None
    log.info(
        "search: image cache %s (needs %.0f MiB, search.cache_mib %d)",
        "on" if cache is not None else "off",
        cache_need,
        s.cache_mib,
    )

    @torch.no_grad()
    def loss_of(plan: dict[str, str]) -> float:
        with fake_quantized(model, plan, settings, cache):
            total = 0.0
            for start in range(0, held.shape[0], s.batch_size):
                batch = held[start : start + s.batch_size].to(device)
                total += lm_loss(model, batch).item() * batch.shape[0]
        return total / held.shape[0]

    space = build_space(targets, s.granularity, list(s.choices), settings)
    result = search(space, loss_of, budget, s.trials, s.random_starts, list(s.importance_spreads), params.seed)
    best, uniform = result.best(), result.uniform()
    rows = [t.row(space.labels, space.choices) for t in result.trials]
    write_json(args.plan, {"schemes": space.plan(best.index), "settings": asdict(settings), "dtype": m.dtype})
    write_json(args.trials, rows)
    write_json(
        args.metrics,
        {
            "budget": {"bits": s.budget_bits, "bytes": s.budget_bytes},
            "best": {
                "loss": round(best.loss, 6),
                "avg_bits": round(best.avg_bits, 4),
                "bytes": best.quantized_bytes,
                "trial": best.trial,
                "source": best.source,
            },
            "uniform": {
                "loss": round(uniform.loss, 6),
                "avg_bits": round(uniform.avg_bits, 4),
                "bytes": uniform.quantized_bytes,
                "scheme": space.choices[uniform.index[0]],
            },
            "trials": len(rows),
        },
    )
    # Per group: a plot, not a metric (one column per layer would bury the headline numbers in `dvc metrics show`).
    write_json(
        args.sensitivity,
        [{"group": label, "loss_increase": round(v, 6)} for label, v in zip(space.labels, result.importance)],
    )
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
