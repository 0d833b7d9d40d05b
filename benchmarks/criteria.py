"""Every registered criterion at targets 0.2 and 0.5 of all parameters, without recovery.

For each criterion: scoring time, then for each target the achieved fraction and the evaluation
perplexity (LLM-Pruner protocol, evaluate.seq_lens[0] tokens), on the default model and the given data.

    python benchmarks/criteria.py [DATA] [--model models/base] [--criteria l1 l2 ...] [--targets 0.2 0.5]
    python benchmarks/criteria.py ../shared/data/c4/c4_validation_2k.jsonl
    python benchmarks/criteria.py ../shared/data/c4/c4_validation_2k.jsonl --criteria bip --reconstruct

``--reconstruct`` also evaluates each cut after least-squares reconstruction (prune.reconstruct_ridge from the
params file) and prints its time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from common import add_common_args, make_setup

    from prunekit.errors import PrunekitError
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models.loading import load_model
    from prunekit.models.size import count_params
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.allocations import make_plan
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.plan import PlanRequest
    from prunekit.pruning.reconstruction import reconstruct
    from prunekit.pruning.schedules import Cut
    from prunekit.pruning.slicing import apply_plan, layouts, prunable_layers
    from prunekit.pruning.units import UNITS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--criteria", nargs="*", default=None, help="default: every registered criterion")
    parser.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.5])
    parser.add_argument("--reconstruct", action="store_true", help="also with least_squares reconstruction")
    args = parser.parse_args()
    params = load_params(args.params)
    setup = make_setup(args)
    dense, _, adapter = load_model(setup.model_dir, params.model.dtype, params.model.device)
    p = params.prune
    n_layers = len(adapter.layers(dense))
    dense_ppl = perplexity(dense, setup.evaluation, params.evaluate.batch_size)["ppl"]
    print(
        f"model {args.model}, data {args.data}, {setup.evaluation.numel()} evaluation tokens, "
        f"units {', '.join(p.units)}, allocation {p.allocation}, layers {p.skip_first}..{n_layers - p.skip_last - 1}"
    )
    print(f"dense perplexity: {dense_ppl:.2f}\n")
    ls = [f" | ppl @{t} least_squares (x dense) | reconstruction s" for t in args.targets] if args.reconstruct else []
    heads = [f"achieved @{t} | ppl @{t} (x dense)" + (ls[i] if ls else "") for i, t in enumerate(args.targets)]
    print("| criterion | scoring s | " + " | ".join(heads) + " |")
    print("|---|---|" + ("---|---|" + ("---|---|" if ls else "")) * len(args.targets))

    def request(units: list[str]) -> ScoreRequest:
        return ScoreRequest(
            units, list(range(n_layers)), setup.calibration, params.score.batch_size, params.seed,
            params.score,
        )  # fmt: skip

    notes: list[str] = []
    for name in args.criteria or CRITERIA.names():
        units = [u for u in p.units if u in UNITS]
        start = time.perf_counter()
        try:
            scores = CRITERIA.get(name).score(dense, adapter, request(units))
        except PrunekitError:  # a criterion for whole layers only (block_influence): prune layers with it
            units = ["layer"]
            start = time.perf_counter()
            scores = CRITERIA.get(name).score(dense, adapter, request(units))
        seconds = time.perf_counter() - start
        cells = []
        for target in args.targets:
            lays = layouts(dense, adapter, units, prunable_layers(n_layers, p.skip_first, p.skip_last))
            req = PlanRequest(target, count_params(dense), lays, dict(p.round_to), p.tolerance)
            try:
                plan = make_plan(scores, req, p.allocation, criterion=name)
            except PrunekitError as e:  # e.g. whole layers cannot hit the target within the tolerance
                cells.append("n/a | n/a" + (" | n/a | n/a" if args.reconstruct else ""))
                notes.append(f"{name} @{target}: {e}")
                continue
            pruned = apply_plan(copy.deepcopy(dense), adapter, plan)
            ppl = perplexity(pruned, setup.evaluation, params.evaluate.batch_size)["ppl"]
            cells.append(f"{plan.achieved:.4f} | {ppl:.2f} ({ppl / dense_ppl:.2f}x)")
            del pruned
            if args.reconstruct:
                refit, t0 = copy.deepcopy(dense), time.perf_counter()
                choice = Cut.of(p, params.score.criterion).refit_choice()
                reconstruct(refit, adapter, plan, setup.calibration, params.score.batch_size, choice)
                spent = time.perf_counter() - t0
                ppl = perplexity(apply_plan(refit, adapter, plan), setup.evaluation, params.evaluate.batch_size)["ppl"]
                cells[-1] += f" | {ppl:.2f} ({ppl / dense_ppl:.2f}x) | {spent:.1f}"
                del refit
        name = name if units != ["layer"] else f"{name} (layer unit)"
        print(f"| {name} | {seconds:.1f} | " + " | ".join(cells) + " |", flush=True)
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
