"""Pruned-model quality without and with least-squares reconstruction, then LM-loss vs distillation recovery.

For each criterion and target (fraction of all parameters): the cut with ``prune.*`` of the params file, its
perplexity (evaluate.seq_lens[0] tokens, the data's evaluation split, disjoint from calibration and training)
plainly sliced and after ``least_squares`` reconstruction, with the reconstruction's time and the process's peak
resident memory. Then, for the best of those at the first target, ``--steps`` LoRA steps (recover.lora) with the
LM loss and with distillation from the dense model (same tokens, same seed). Every figure also as a ratio to
the dense model's perplexity.

    python benchmarks/quality.py ../shared/data/c4/c4_validation_2k.jsonl --criteria bip param_first \\
        --targets 0.2 0.5 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    from common import add_common_args, make_setup

    from prunekit.data.sources import load_documents
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models.loading import load_model
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.plan import PlanRequest, make_plan
    from prunekit.pruning.reconstruction import reconstruct
    from prunekit.pruning.slicing import apply_plan, count_params, layouts, prunable_layers
    from prunekit.training.lora import LoraSettings, recovery_loss, train_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--criteria", nargs="*", default=["bip", "param_first"])
    parser.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.5])
    parser.add_argument("--steps", type=int, default=20, help="LoRA steps of each recovery (0: no recovery)")
    args = parser.parse_args()
    params = load_params(args.params)
    setup = make_setup(args)
    dense, tokenizer, adapter = load_model(setup.model_dir, params.model.dtype, params.model.device)
    p, bs = params.prune, params.evaluate.batch_size
    n_layers = len(adapter.layers(dense))

    def ppl(model) -> float:
        return perplexity(model, setup.evaluation, bs)["ppl"]

    dense_ppl = ppl(dense)
    print(f"model {args.model}, data {args.data}, {setup.evaluation.numel()} evaluation tokens, units "
          f"{', '.join(p.units)}, layers {p.skip_first}..{n_layers - p.skip_last - 1}, "
          f"ridge {p.reconstruct_ridge}; dense perplexity {dense_ppl:.2f}\n")  # fmt: skip
    print(
        "| criterion | target | achieved | ppl sliced (x dense) | ppl least_squares (x dense) | reconstruction s "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    best = None
    for name in args.criteria:
        req = ScoreRequest(list(p.units), list(range(n_layers)), setup.calibration, params.score.batch_size,
                           params.seed, params.score.model_dump())  # fmt: skip
        scores = CRITERIA.get(name).score(dense, adapter, req)
        for target in args.targets:
            lays = layouts(dense, adapter, list(p.units), prunable_layers(n_layers, p.skip_first, p.skip_last))
            plan = make_plan(scores, PlanRequest(target, count_params(dense), lays, dict(p.round_to), p.tolerance),
                             p.allocation, criterion=name)  # fmt: skip
            plain = ppl(apply_plan(copy.deepcopy(dense), adapter, plan))
            refit, t0 = copy.deepcopy(dense), time.perf_counter()
            reconstruct(refit, adapter, plan, setup.calibration, params.score.batch_size, p.reconstruct_ridge)
            seconds = time.perf_counter() - t0
            apply_plan(refit, adapter, plan)
            fitted = ppl(refit)
            row = f"| {name} | {target} | {plan.achieved:.4f} | {plain:.2f} ({plain / dense_ppl:.2f}x) | "
            row += f"{fitted:.2f} ({fitted / dense_ppl:.2f}x) | {seconds:.1f} | {peak_rss_mib():.0f} |"
            print(row, flush=True)
            if target == args.targets[0] and (best is None or min(plain, fitted) < best[0]):
                best = (
                    min(plain, fitted),
                    name,
                    refit if fitted <= plain else apply_plan(copy.deepcopy(dense), adapter, plan),
                )
            del refit
    if not args.steps or best is None:
        return
    _, name, model = best
    text = token_stream(tokenizer, load_documents(args.data, "training", text_field=params.data.text_field))
    blocks = chunks(text, params.recover.lora.seq_len, "training")
    settings = LoraSettings.from_params(params.recover.lora, params.seed, "recover.lora", steps=args.steps)
    print(
        f"\nrecovery of the best cut at {args.targets[0]} ({name}): {args.steps} LoRA steps x "
        f"{settings.batch_size} x {params.recover.lora.seq_len} tokens, temperature {params.recover.temperature}\n"
    )
    print("| recovery loss | ppl (x dense) | seconds |")
    print("|---|---|---|")
    for kind in ("lm", "kd"):
        t0 = time.perf_counter()
        loss = recovery_loss(kind, dense, params.recover.temperature)
        recovered, _ = train_lora(copy.deepcopy(model), blocks, settings, desc=f"LoRA {kind}", loss=loss)
        value = ppl(recovered)
        print(f"| {kind} | {value:.2f} ({value / dense_ppl:.2f}x) | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
