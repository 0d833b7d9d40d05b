"""One-shot vs iterative vs k-shot pruning with the same total number of LoRA steps, side by side.

    python benchmarks/schedules.py [DATA] [--model models/base] [--steps 40] [--targets 0.2 0.5]

For each target: `oneshot` = `param_first` scores, one cut, then `--steps` LoRA recovery steps (merged);
`iterative` = LoRAPrune: `--steps` LoRA steps with `lora` masks raised on the cubic schedule (schedule.warmup /
cooldown / prune_freq / ema from params.yaml), then sliced and merged; `kshot` = TransAct: `activation` scores,
`schedule.shots` cuts, `--steps / shots` LoRA steps after each. LoRA rank, alpha, dropout, learning rate, batch
and length come from params.yaml's `schedule` section for all three. Every run is a fresh process (so peak
memory does not mix); printed per run: achieved fraction, evaluation perplexity (evaluate.seq_lens[0] tokens,
--eval-chunks chunks), wall time of pruning + training, and peak memory (process VmHWM on CPU, CUDA max
allocated on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEDULES = ("oneshot", "iterative", "kshot")  # in the order of the table


def run_one(args: argparse.Namespace) -> dict[str, float]:
    from common import make_setup

    from prunekit.data.sources import load_documents
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.efficiency import peak_memory_mib, reset_peak_memory
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.models.loading import load_model
    from prunekit.models.size import count_params
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.schedules import Cut, PruneJob, prune_model
    from prunekit.training.lora import LoraSettings, train_lora

    params = load_params(args.params)
    sc = params.schedule
    setup = make_setup(args)
    model, tokenizer, adapter = load_model(setup.model_dir, params.model.dtype, args.device)
    docs = load_documents(args.data, "training", text_field=params.data.text_field)
    blocks = chunks(token_stream(tokenizer, docs), sc.lora.seq_len, "training")
    device = next(model.parameters()).device
    reset_peak_memory(device)
    start = time.perf_counter()
    original = count_params(model)
    criterion = {"oneshot": "param_first", "iterative": "lora", "kshot": "activation"}[args.schedule]
    cut = dataclasses.replace(Cut.of(params.prune, criterion), target=args.target)
    # Every run trains args.steps LoRA steps in all: after the cut, during it, or split over the shots.
    lora = sc.lora.model_copy(update={"steps": args.steps})
    schedule = sc.model_copy(update={"lora": lora, "steps_per_shot": args.steps // sc.shots})
    first = {}
    if args.schedule != "iterative":  # the iterative schedule scores from its own training adapters
        req = ScoreRequest(list(cut.units), cut.layers(model, adapter), setup.calibration, params.score.batch_size,
                           params.seed, params.score)  # fmt: skip
        first = CRITERIA.get(criterion).score(model, adapter, req)
    job = PruneJob(model, tokenizer, adapter, first, cut, params.seed, schedule=schedule,
                   training_blocks=lambda seq_len: blocks, calibration=lambda: setup.calibration,
                   score_batch_size=params.score.batch_size, score_options=params.score)  # fmt: skip
    model = prune_model(job, args.schedule).model
    if args.schedule == "oneshot":
        model, _ = train_lora(
            model, blocks, LoraSettings.from_params(lora, params.seed, "schedule.lora", warmup_steps=0)
        )
    seconds = time.perf_counter() - start
    peak, _ = peak_memory_mib(device)
    ppl = perplexity(model, setup.evaluation, params.evaluate.batch_size)["ppl"]
    return {"achieved": 1 - count_params(model) / original, "ppl": ppl, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps per run, in all")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--schedule", choices=SCHEDULES, help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.schedule:
        print(json.dumps(run_one(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for target in args.targets:
        for schedule in SCHEDULES:
            cmd = [sys.executable, __file__, args.data, "--model", args.model, "--params", args.params, "--device",
                   args.device, "--steps", str(args.steps), "--eval-chunks", str(args.eval_chunks),
                   "--schedule", schedule, "--target", str(target)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:  # e.g. a target the model's units cannot meet: say why, go on with the others
                reason = next((ln for ln in reversed(out.stderr.splitlines()) if "Error" in ln), "see stderr")
                rows.append((target, schedule, {"error": reason.strip()}))
                continue
            rows.append((target, schedule, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"model {args.model}, data {args.data}, device {args.device}, {args.steps} LoRA steps per run")
    print("| target | schedule | achieved | perplexity | seconds | peak MiB |")
    print("|---|---|---|---|---|---|")
    for target, schedule, r in rows:
        if "error" in r:
            print(f"| {target} | {schedule} | failed: {r['error']} | | | |")
            continue
        cells = f"{r['achieved']:.4f} | {r['ppl']:.2f} | {r['seconds']:.0f} | {r['peak_mib']:.0f}"
        print(f"| {target} | {schedule} | {cells} |")


if __name__ == "__main__":
    main()
