"""Peak memory of scoring with `param_first` (gradients of every scored weight) and `lora` (LoRA gradients only).

Each (criterion, gradient checkpointing) pair runs in its own fresh process so peaks do not mix; the rows are
printed side by side with the lora / param_first ratios.

    python benchmarks/score_memory.py [DATA] [--model models/base] [--device cpu|cuda]

Per row: `model_mib`, the resident memory once the model is loaded and has run one forward pass (weights
paged in, Python and torch included); `peak_mib`, the highest resident memory while scoring; `added_mib`
= peak - model, what the criterion itself needs (activations, gradients, adapters, temporaries). On CUDA the
same three numbers come from `torch.cuda.memory_allocated` / `max_memory_allocated` (no CUDA context).

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

    from prunekit.criteria import CRITERIA, ScoreRequest
    from prunekit.models.loading import load_model
    from prunekit.params import load_params

    params = load_params(args.params)
    setup = make_setup(args)
    model, _, adapter = load_model(setup.model_dir, params.model.dtype, args.device)
    with torch.no_grad():  # page every weight in, so the model's own memory is in the baseline
        model(input_ids=setup.calibration[:1].to(args.device))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        base = _status_mib("VmRSS")
    options = {**params.score.model_dump(), "gradient_checkpointing": args.checkpointing == "on"}
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
    return {"seconds": seconds, "model_mib": base, "peak_mib": peak, "added_mib": peak - base}


def main() -> None:
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--criterion", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--checkpointing", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.criterion:
        print(json.dumps(measure(args)))
        return
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for checkpointing in ("off", "on"):
        for criterion in ("param_first", "lora"):
            cmd = [sys.executable, __file__, args.data, "--model", args.model, "--params", args.params]
            cmd += ["--device", args.device, "--criterion", criterion, "--checkpointing", checkpointing]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows[criterion, checkpointing] = json.loads(out.stdout.strip().splitlines()[-1])
    malloc = "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=65536"
    print(
        f"model {args.model}, data {args.data}, device {args.device}" + ("" if args.device != "cpu" else f", {malloc}")
    )
    keys = ["seconds", "model_mib", "peak_mib", "added_mib"]
    print("| criterion | gradient checkpointing | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for (name, checkpointing), r in rows.items():
        print(f"| {name} | {checkpointing} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print()
    for checkpointing in ("off", "on"):
        lora, first = rows["lora", checkpointing], rows["param_first", checkpointing]
        print(
            f"checkpointing {checkpointing}: lora / param_first peak {lora['peak_mib'] / first['peak_mib']:.3f}, "
            f"added by scoring {lora['added_mib'] / first['added_mib']:.3f}"
        )


if __name__ == "__main__":
    main()
