"""Evaluation perplexity of the searched mixed-precision plan against the uniform plan at the same budget.

Both plans are realised on the recovered model (no QLoRA, so only the plan differs) and evaluated on the
evaluation split with the pipeline's protocol, side by side with the unquantized model.

    python benchmarks/quant_plans.py [DATA] [--model models/recovered] [--plan data/quant_plan.json]

Run `dvc repro` first: it writes the recovered model, the searched plan and metrics/search.json (uniform scheme).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from common import add_common_args, make_setup

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(model=str(ROOT / "models/recovered"))
    parser.add_argument("--plan", default=str(ROOT / "data/quant_plan.json"))
    parser.add_argument("--search-metrics", default=str(ROOT / "metrics/search.json"))
    args = parser.parse_args()

    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models.loading import load_model
    from prunekit.pipeline.params import load_params
    from prunekit.quant.plan import read_plan
    from prunekit.quant.realise import plan_cost_of_model, quantized_weight_bytes, realise

    params = load_params(args.params)
    setup = make_setup(args)
    searched, settings, _ = read_plan(Path(args.plan))
    uniform_scheme = json.loads(Path(args.search_metrics).read_text())["uniform"]["scheme"]
    plans = {
        "unquantized": None,
        f"uniform {uniform_scheme}": {name: uniform_scheme for name in searched},
        "searched": searched,
    }
    print(f"model {args.model}, data {args.data}, {setup.evaluation.numel()} evaluation tokens")
    print("| plan | avg bits | weight MiB | ppl | seconds |")
    print("|---|---|---|---|---|")
    for label, plan in plans.items():
        model, _, _ = load_model(args.model, params.model.dtype, "cpu")
        bits = "-"
        if plan is not None:
            realise(model, plan, settings)
            bits = f"{plan_cost_of_model(model, plan):.3f}"
        start = time.perf_counter()
        ppl = perplexity(model, setup.evaluation, params.evaluate.batch_size)["ppl"]
        mib = quantized_weight_bytes(model) / 2**20
        print(f"| {label} | {bits} | {mib:.1f} | {ppl:.3f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
