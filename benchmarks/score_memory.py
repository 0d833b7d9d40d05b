"""Peak memory of scoring with `param_first` (gradients of every weight) and `lora` (LoRA gradients only).

Each criterion runs in its own fresh process so peaks do not mix; printed side by side with their ratio.

    python benchmarks/score_memory.py [DATA] [--model models/base] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Score once with ``args.criterion`` in this process; return peak memory numbers in MiB."""
    import torch
    from common import make_setup

    from prunekit.criteria import CRITERIA, ScoreRequest
    from prunekit.models.loading import load_model
    from prunekit.params import load_params

    params = load_params(args.params)
    setup = make_setup(args)
    model, _, adapter = load_model(setup.model_dir, params.model.dtype, args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    req = ScoreRequest(
        units=list(params.prune.units),
        layers=list(range(len(adapter.layers(model)))),
        calibration=setup.calibration,
        batch_size=params.score.batch_size,
        seed=params.seed,
        options=params.score.model_dump(),
    )
    start = time.perf_counter()
    CRITERIA.get(args.criterion).score(model, adapter, req)
    out = {
        "seconds": time.perf_counter() - start,
        "peak_rss_after_load_mib": rss_loaded,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_scoring_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def main() -> None:
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--criterion", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.criterion:
        print(json.dumps(measure(args)))
        return
    rows = {}
    for criterion in ("param_first", "lora"):
        cmd = [
            sys.executable,
            __file__,
            args.data,
            "--model",
            args.model,
            "--params",
            args.params,
            "--device",
            args.device,
            "--criterion",
            criterion,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows[criterion] = json.loads(out.stdout.strip().splitlines()[-1])
    keys = list(rows["param_first"])
    print(f"model {args.model}, data {args.data}, device {args.device}")
    print("| criterion | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    peak = "cuda_scoring_mib" if "cuda_scoring_mib" in keys else "peak_rss_mib"
    extra = {n: r[peak] - (0 if peak.startswith("cuda") else r["peak_rss_after_load_mib"]) for n, r in rows.items()}
    print(f"\nlora / param_first peak ({peak}): {rows['lora'][peak] / rows['param_first'][peak]:.3f}")
    print(f"lora / param_first memory added by scoring: {extra['lora'] / extra['param_first']:.3f}")


if __name__ == "__main__":
    main()
