"""Peak memory of scoring with `param_first` (gradients of every scored weight) and `lora` (LoRA gradients only).

Each row (criterion, base dtype, gradient checkpointing) runs in its own fresh process so peaks do not mix;
the rows are printed side by side with the ratios to `param_first`'s. `lora` runs twice: on the float32 base
like `param_first`, and on a bfloat16 frozen base (`score.base_dtype`, as LoRAPrune scores on a half-precision
or 8-bit base; `param_first` cannot, it differentiates the base weights).

    python benchmarks/score_memory.py [DATA] [--model models/base] [--device cpu|cuda] [--checkpointing on off]

Per row: `runtime_mib`, resident memory before the model is loaded (Python, torch, transformers, data);
`model_mib`, once the model is loaded and has run one forward pass (weights paged in); `peak_mib`, the highest
resident memory while scoring; `stage_mib` = peak - runtime, what the scoring holds at its peak (model,
gradients, activations, adapters: the CPU counterpart of CUDA's max allocated); `added_mib` = peak - model,
what the criterion needs beyond the loaded model. On CUDA the numbers come from `torch.cuda.memory_allocated`
/ `max_memory_allocated` (no CUDA context; runtime 0).

On CPU the peak is the process's VmHWM (reset after the model is resident, Linux `/proc/self/clear_refs`).
The children run with `MALLOC_MMAP_THRESHOLD_=65536`: glibc otherwise raises its mmap threshold after the
first large frees and keeps later freed blocks in the heap, so resident memory would measure the
allocator's retention rather than the tensors alive at the peak (`--glibc-default` measures that instead).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

STATUS = Path("/proc/self/status")


def _status_mib(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.M).group(1)) / 1024


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Score once with ``args.criterion`` in this process; return its memory numbers in MiB."""
    import torch
    from common import make_setup

    from prunekit.models.loading import load_model
    from prunekit.pipeline.params import load_params
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest

    params = load_params(args.params)
    setup = make_setup(args)
    cuda = args.device.startswith("cuda")
    runtime = torch.cuda.memory_allocated() / 2**20 if cuda else _status_mib("VmRSS")
    model, _, adapter = load_model(setup.model_dir, args.base_dtype, args.device)
    with torch.no_grad():  # page every weight in, so the model's own memory is in the baseline
        model(input_ids=setup.calibration[:1].to(args.device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        base = _status_mib("VmRSS")
    options = params.score.model_copy(update={"gradient_checkpointing": args.checkpointing == "on"})
    req = ScoreRequest(
        units=list(params.prune.units),
        layers=list(range(len(adapter.layers(model)))),
        calibration=setup.calibration,
        batch_size=params.score.batch_size,
        seed=params.seed,
        options=options,
    )
    start = time.perf_counter()
    CRITERIA.get(args.criterion).score(model, adapter, req)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mib("VmHWM")
    return {
        "seconds": seconds,
        "runtime_mib": runtime,
        "model_mib": base,
        "peak_mib": peak,
        "stage_mib": peak - runtime,
        "added_mib": peak - base,
    }


def main() -> None:
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument("--criterion", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--base-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.criterion:
        args.checkpointing = args.checkpointing[0]
        print(json.dumps(measure(args)))
        return
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    from prunekit.pipeline.params import load_params

    model_dtype = load_params(args.params).model.dtype
    configs = [("param_first", model_dtype), ("lora", model_dtype), ("lora", "bfloat16")]
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for checkpointing in args.checkpointing:
        for criterion, dtype in configs:
            cmd = [sys.executable, __file__, args.data, "--model", args.model, "--params", args.params]
            cmd += ["--device", args.device, "--criterion", criterion, "--checkpointing", checkpointing]
            cmd += ["--base-dtype", dtype]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows[criterion, dtype, checkpointing] = json.loads(out.stdout.strip().splitlines()[-1])
    malloc = "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536"
    print(
        f"model {args.model}, data {args.data}, device {args.device}" + ("" if args.device != "cpu" else f", {malloc}")
    )
    keys = ["seconds", "runtime_mib", "model_mib", "peak_mib", "stage_mib", "added_mib"]
    print("| criterion | base dtype | gradient checkpointing | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 3) + "|")
    for (name, dtype, checkpointing), r in rows.items():
        print(f"| {name} | {dtype} | {checkpointing} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print()
    for checkpointing in args.checkpointing:
        first = rows["param_first", model_dtype, checkpointing]
        for _, dtype in configs[1:]:
            lora = rows["lora", dtype, checkpointing]
            ratios = ", ".join(f"{k} {lora[k] / first[k]:.3f}" for k in ("peak_mib", "stage_mib", "added_mib"))
            print(f"checkpointing {checkpointing}, lora on a {dtype} base / param_first: {ratios}")


if __name__ == "__main__":
    main()
