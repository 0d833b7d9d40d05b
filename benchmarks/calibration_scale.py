"""Time and peak memory of calibration against its size: scoring, reconstruction and the search's objective.

For each number of calibration tokens (`--tokens`; 640 is LLM-Pruner's 10 x 64, larger counts are windows of
`--seq-len`) and each pass that reads every calibration window, one fresh process loads the model, draws the
windows from the data's calibration split (seeded, as the calibrate stage does) and runs:

- `score`: the `--criterion` scores of `prune.units` in every layer (one forward pass; statistics accumulated per
  batch in hooks, nothing per token kept);
- `reconstruct`: least-squares reconstruction (`prune.reconstruct_ridge`, `prune.reconstruct_holdout`) of the
  uniform cut at `--target` ranked by `l2` weight norms (cheap scores, so the row times the refit alone), the
  calibration hidden states of the current layer in memory up to `--activations-mib`, on disk beyond it;
- `objective`: the allocation search's first evaluation of a candidate (the flat profile at `--target`): the
  unpruned model's reference hidden states (held as above) and one candidate's KL over every window.

Per row: seconds of the pass alone (model loading excluded), `runtime_mib` (resident memory once the model and the
windows are read), `peak_mib` (the process's highest resident memory, VmHWM) and `pass_mib` = peak - runtime, and
the size of every window's hidden states (what a pass holding them all would keep in memory). The children run with
`MALLOC_MMAP_THRESHOLD_=65536` so freed tensors leave resident memory.

    python benchmarks/calibration_scale.py ../shared/data/c4/c4_validation_2k.jsonl --model models/base \\
        --tokens 640 8192 32768 65536 --activations-mib 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = Path("/proc/self/status")
PASSES = ("score", "reconstruct", "objective")


def _status_mib(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.M).group(1)) / 1024


def shape(tokens: int, seq_len: int) -> tuple[int, int]:
    """(windows, tokens per window) of a calibration of ``tokens`` tokens."""
    return (10, 64) if tokens == 640 else (tokens // seq_len, seq_len)


def child(job: dict) -> dict:
    import dataclasses

    import torch

    from prunekit.data.sources import load_documents
    from prunekit.data.tokens import random_windows, token_stream
    from prunekit.models.loading import load_model
    from prunekit.models.size import count_params
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.allocations.search import candidate_objective
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.reconstruction import reconstruct
    from prunekit.pruning.schedules import Cut

    params = load_params(job["params"])
    torch.set_num_threads(params.runtime.threads or os.cpu_count() or 1)
    model, tokenizer, adapter = load_model(job["model"], params.model.dtype, params.model.device)
    stream = token_stream(tokenizer, load_documents(job["data"], "calibration", text_field=params.data.text_field))
    windows, seq_len = shape(job["tokens"], job["seq_len"])
    calibration = random_windows(stream, windows, seq_len, params.seed)
    p, bs, mib = params.prune, params.score.batch_size, job["activations_mib"]
    layers = list(range(len(adapter.layers(model))))
    runtime = _status_mib("VmRSS")
    req = ScoreRequest(list(p.units), layers, calibration, bs, params.seed, params.score)
    start = time.perf_counter()
    if job["pass"] == "score":
        CRITERIA.get(job["criterion"]).score(model, adapter, req)
    else:
        scores = CRITERIA.get("l2").score(model, adapter, req)
        cut = dataclasses.replace(Cut.of(p, "l2"), target=job["target"], allocation="uniform")
        plan = cut.plan(scores, cut.request(model, adapter, cut.target, count_params(model)))
        start = time.perf_counter()
        if job["pass"] == "reconstruct":
            reconstruct(model, adapter, plan, calibration, bs, cut.refit_choice(), activations_mib=mib)
        else:
            candidate_objective(model, adapter, calibration, bs, "kl", activations_mib=mib)(plan)
    seconds = time.perf_counter() - start
    hidden = calibration.numel() * model.config.hidden_size * torch.finfo(model.dtype).bits // 8
    return {"seconds": seconds, "runtime_mib": runtime, "peak_mib": _status_mib("VmHWM"),
            "hidden_mib": hidden / (1 << 20), "windows": windows, "seq_len": seq_len}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default="python-docs", help="data source: python-docs or a local file")
    parser.add_argument("--model", default=str(ROOT / "models/base"), help="model directory (dvc repro writes it)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--tokens", nargs="*", type=int, default=[640, 8192, 32768, 65536])
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window beyond 640 tokens")
    parser.add_argument("--passes", nargs="*", default=list(PASSES), choices=PASSES)
    parser.add_argument("--criterion", default="bip", help="the score pass's criterion")
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--activations-mib", type=int, default=2048, help="model.offload_activations_mib")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"model {args.model}, data {args.data}, criterion {args.criterion}, target {args.target}, hidden states in "
          f"memory up to {args.activations_mib} MiB\n")  # fmt: skip
    print("| tokens | windows x length | pass | seconds | runtime MiB | peak MiB | pass MiB | all hidden states MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for name in args.passes:
            job = {"pass": name, "tokens": tokens, "seq_len": args.seq_len, "model": args.model, "data": args.data,
                   "params": args.params, "criterion": args.criterion, "target": args.target,
                   "activations_mib": args.activations_mib}  # fmt: skip
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            label = f"{name} ({args.criterion})" if name == "score" else name
            print(f"| {tokens} | {r['windows']} x {r['seq_len']} | {label} | {r['seconds']:.1f} | "
                  f"{r['runtime_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['runtime_mib']:.0f} | "
                  f"{r['hidden_mib']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
