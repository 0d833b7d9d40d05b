"""Pruned-model quality by allocation (uniform, search) and reconstruction, then LM-loss vs distillation recovery.

For each criterion, target (fraction of all parameters) and allocation: the one-shot cut the prune stage makes
(``prune.*`` of the params file, the library's schedule), plainly sliced and with ``least_squares``
reconstruction, its perplexity (evaluate.seq_lens[0] tokens, the data's evaluation split, disjoint from calibration
and training, and the evaluation split of ``--second-text``, another domain), the cut's time (search and
reconstruction included) and the process's peak resident memory so far. ``--calibration-mix`` draws half the
calibration windows from another source's calibration split, as ``data.calibration: [data, SOURCE]`` does.
Then, for the best of those at the first target, ``--steps`` steps of recovery (recover.lora's optimiser, batches
and schedule) for each ``--methods`` (LoRA adapters, or full fine-tuning of every weight) and ``--losses`` (the LM
loss, distillation from the dense model, or both; same tokens, same seed). Every figure also as a ratio to the
dense model's.

    python benchmarks/quality.py ../shared/data/c4/c4_validation_2k.jsonl --criteria bip param_first \\
        --targets 0.2 0.5 --cuts uniform:none search:none --steps 20 --methods lora full --losses lm kd
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
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
    from prunekit.data.tokens import chunks, mixed_windows, token_stream
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.evaluation.zeroshot import auto_mc_rows, zero_shot
    from prunekit.models.loading import load_model
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.criteria.base import LayerCriterion
    from prunekit.pruning.schedules import Cut, PruneJob, prune_model
    from prunekit.training.lora import LoraSettings, recovery_loss, train_full, train_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--criteria", nargs="*", default=["bip", "param_first"])
    parser.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.5])
    cuts = ["uniform:none", "uniform:least_squares", "search:none", "search:least_squares"]
    parser.add_argument("--cuts", nargs="*", default=cuts, help="prune.allocation:prune.reconstruct pairs")
    parser.add_argument("--steps", type=int, default=20, help="steps of each recovery (0: no recovery)")
    parser.add_argument("--methods", nargs="*", default=["lora"], choices=["lora", "full"], help="recover.method")
    parser.add_argument("--losses", nargs="*", default=["lm", "kd"], choices=["lm", "kd", "lm_kd"],
                        help="recover.loss")  # fmt: skip
    parser.add_argument("--questions", type=int, default=100, help="auto_mc questions from the evaluation split")
    parser.add_argument("--second-text", default="python-docs",
                        help="a second held-out text (a data source): its evaluation split's perplexity")  # fmt: skip
    parser.add_argument("--calibration-mix", default=None, metavar="SOURCE",
                        help="half the calibration windows from this source's calibration split (as "
                             "data.calibration: [data, SOURCE])")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    for name in ("prunekit.pruning.allocations.search", "prunekit.pruning.schedules.base"):
        logging.getLogger(name).setLevel(logging.INFO)
    params = load_params(args.params)
    setup = make_setup(args)
    dense, tokenizer, adapter = load_model(setup.model_dir, params.model.dtype, params.model.device)
    text = token_stream(tokenizer, load_documents(args.data, "training", text_field=params.data.text_field))
    if args.calibration_mix:  # as the calibrate stage draws them for data.calibration: [data, mix]
        streams = [token_stream(tokenizer, load_documents(s, "calibration", text_field=params.data.text_field))
                   for s in (args.data, args.calibration_mix)]  # fmt: skip
        setup.calibration = mixed_windows(streams, params.calibrate.samples, params.calibrate.seq_len, params.seed)
    p, bs = params.prune, params.score.batch_size
    n_layers = len(adapter.layers(dense))

    def ppl(model) -> float:
        return perplexity(model, setup.evaluation, params.evaluate.batch_size)["ppl"]

    second_docs = load_documents(args.second_text, "evaluation", text_field=params.data.text_field)
    second = chunks(token_stream(tokenizer, second_docs), params.evaluate.seq_lens[0], "evaluation")[: args.eval_chunks]

    def ppl2(model) -> float:
        return perplexity(model, second, params.evaluate.batch_size)["ppl"]

    z = params.evaluate.zero_shot
    documents = load_documents(args.data, "evaluation", text_field=params.data.text_field)
    questions = auto_mc_rows(documents, args.questions, z.auto_mc_choices, z.auto_mc_context_words,
                             z.auto_mc_continuation_words, params.seed)  # fmt: skip

    def accuracy(model) -> float:
        return zero_shot(model, tokenizer, ["auto_mc"], auto_rows=questions, batch_size=z.batch_size,
                         seed=params.seed)["auto_mc"]["acc"]  # fmt: skip

    dense_ppl, dense_acc, dense_ppl2 = ppl(dense), accuracy(dense), ppl2(dense)
    print(f"model {args.model}, data {args.data}, {setup.evaluation.numel()} evaluation tokens, "
          f"{setup.calibration.shape[0]} x {setup.calibration.shape[1]} calibration tokens"
          f"{f' (half of them {args.calibration_mix})' if args.calibration_mix else ''}, units "
          f"{', '.join(p.units)}, bias compensation {p.bias_compensation}, layers {p.skip_first}.."
          f"{n_layers - p.skip_last - 1}, ridge {p.reconstruct_ridge}, "
          f"search {p.search.candidates} candidates ({p.search.objective}, {p.search.knots} knots); "
          f"dense perplexity {dense_ppl:.2f}, auto_mc accuracy {dense_acc:.3f} ({args.questions} questions); "
          f"{args.second_text}: {second.numel()} evaluation tokens, dense perplexity {dense_ppl2:.2f}"
          "\n")  # fmt: skip
    print("| criterion | target | allocation | reconstruct | achieved | ppl (x dense) | "
          f"{args.second_text} ppl (x dense) | auto_mc acc (x dense) | cut s | peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    best = None
    for name in args.criteria:
        req = ScoreRequest(list(p.units), list(range(n_layers)), setup.calibration, bs, params.seed,
                           params.score)  # fmt: skip
        criterion = CRITERIA.get(name)
        # Side data (FLAP's channel means) for prune.bias_compensation, from the criteria that record it.
        scores, side = criterion.score_with_aux(dense, adapter, req) if isinstance(criterion, LayerCriterion) else (
            criterion.score(dense, adapter, req), {})  # fmt: skip
        for target in args.targets:
            for allocation, method in (pair.split(":") for pair in args.cuts):
                cut = dataclasses.replace(Cut.of(p, name), target=target, allocation=allocation, reconstruct=method)
                job = PruneJob(copy.deepcopy(dense), tokenizer, adapter, scores, cut, params.seed, side,
                               activations_mib=params.model.offload_activations_mib, score_batch_size=bs,
                               calibration=lambda: setup.calibration,
                               training_blocks=lambda n: chunks(text, n, "training"))  # fmt: skip
                t0 = time.perf_counter()
                result = prune_model(job, "oneshot")
                seconds = time.perf_counter() - t0
                value, value2 = ppl(result.model), ppl2(result.model)
                acc = accuracy(result.model)
                cells = [name, target, allocation, method, f"{result.plan.achieved:.4f}",
                         f"{value:.2f} ({value / dense_ppl:.2f}x)", f"{value2:.2f} ({value2 / dense_ppl2:.2f}x)",
                         f"{acc:.3f} ({acc / dense_acc:.2f}x)",
                         f"{seconds:.0f}", f"{peak_rss_mib():.0f}"]  # fmt: skip
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
                if target == args.targets[0] and (best is None or value < best[0]):
                    best = (value, f"{name}, {allocation}, {method}", result.model)
                del job, result
    if not args.steps or best is None:
        return
    _, name, model = best
    blocks = chunks(text, params.recover.lora.seq_len, "training")
    settings = LoraSettings.from_params(params.recover.lora, params.seed, "recover.lora", steps=args.steps)
    print(
        f"\nrecovery of the best cut at {args.targets[0]} ({name}): {args.steps} steps x {settings.batch_size} x "
        f"{params.recover.lora.seq_len} tokens, learning rate {settings.learning_rate}, temperature "
        f"{params.recover.temperature}\n"
    )
    print("| method | recovery loss | ppl (x dense) | auto_mc acc (x dense) | seconds | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        for kind in args.losses:
            t0 = time.perf_counter()
            loss = recovery_loss(kind, dense, params.recover.temperature)
            if method == "lora":
                recovered, _ = train_lora(copy.deepcopy(model), blocks, settings, desc=f"LoRA {kind}", loss=loss)
            else:
                recovered, _ = train_full(copy.deepcopy(model), blocks, settings, desc=f"full {kind}", loss=loss)
            seconds, value, acc = time.perf_counter() - t0, ppl(recovered), accuracy(recovered)
            cells = [
                method,
                kind,
                f"{value:.2f} ({value / dense_ppl:.2f}x)",
                f"{acc:.3f} ({acc / dense_acc:.2f}x)",
                f"{seconds:.0f}",
                f"{peak_rss_mib():.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
            del recovered


if __name__ == "__main__":
    main()
