"""Peak memory of the score and prune stages with the whole model in memory and layer by layer (`model.offload`).

Each (model, stage, mode) runs the stage's function (`stages/score.py`, `stages/prune.py`) in its own fresh
process, so peaks do not mix; the rows are printed side by side with the layerwise / in-memory ratios, and the
two modes' outputs are compared (score files: largest relative difference over every unit; pruned models:
largest absolute weight difference over every tensor).

    python benchmarks/offload_memory.py [--model models/base] [--shape qwen2.5-0.5b] [--criteria activation bip]
        [--prune none least_squares]

`--prune` cuts each model with the params' `prune` section (`prune.reconstruct` set to each value given) from the
first criterion's scores.

`--shape` adds a model of a published shape with random weights (seeded), written once to a temporary folder
in bfloat16 like the published checkpoints and scored in `model.dtype` (float32 by default). Calibration: the
params' `calibrate.samples` x `calibrate.seq_len` token ids, drawn with the params' seed (memory does not depend
on which tokens they are).

Per row: `runtime_mib`, resident memory before the model is read (Python, torch, transformers); `peak_mib`, the
process's highest resident memory (VmHWM) over the whole stage, loading included; `stage_mib` = peak - runtime.
The children run with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors leave resident memory (see
benchmarks/score_memory.py). On CUDA (`--device cuda`) the peak is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
STATUS = Path("/proc/self/status")


def _status_mib(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.M).group(1)) / 1024


def child(job: dict) -> dict:
    """Run the stage once in this process; return the memory numbers (MiB) and seconds."""
    import torch

    from prunekit.pipeline.params import load_params, parse_params

    name = job.get("stage", "score")
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    raw = load_params(job["params"]).model_dump()
    raw["model"] |= {"offload": job["mode"], "device": job["device"]}
    raw["score"]["criterion"] = job["criterion"]
    raw["prune"]["reconstruct"] = job.get("reconstruct", "none")
    params = parse_params(raw)
    cuda = job["device"].startswith("cuda")
    runtime = 0.0 if cuda else _status_mib("VmRSS")
    start = time.perf_counter()
    if name == "score":
        stage.score(params, Path(job["model"]), Path(job["calibration"]), Path(job["out"]))
    else:
        out, text = Path(job["out"]), Path(job["out"] + "-text")
        text.mkdir()
        stage.prune(
            params,
            Path(job["model"]),
            Path(job["scores"]),
            out / "model",
            out / "plan.json",
            out / "metrics.json",
            out / "trials.json",
            text,
            Path(job["calibration"]),
            out / "state",
        )
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mib("VmHWM")
    return {"runtime_mib": runtime, "peak_mib": peak, "stage_mib": peak - runtime, "seconds": seconds}


def random_model(shape: str, folder: Path) -> Path:
    """A model of a published shape with seeded random weights, saved in bfloat16."""
    import torch
    from gpu_check import SHAPES
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(SHAPES[shape])
    config = AutoConfig.for_model(sizes.pop("model_type"), **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = folder / shape
    model.save_pretrained(out)
    return out


def run_child(job: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"{job.get('stage', 'score')} {job['mode']} on {job['model']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        raise SystemExit(f"the modes wrote different keys: {sorted(x.keys() ^ y.keys())[:4]}")
    return max(float(((x[k] - y[k]).abs() / x[k].abs().clamp_min(1e-30)).max()) for k in x)


def largest_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between the two model directories' tensors (sharded differently)."""
    from safetensors.torch import load_file

    x, y = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()} for d in (a, b))
    if x.keys() != y.keys():
        raise SystemExit(f"the modes wrote different tensors: {sorted(x.keys() ^ y.keys())[:4]}")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", action="append", default=None, help="model directory (repeatable)")
    parser.add_argument("--shape", action="append", default=[], help="a published shape with random weights")
    parser.add_argument("--criteria", nargs="+", default=["activation", "bip"])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prune", nargs="*", default=[], choices=["none", "least_squares"],
                        help="also the prune stage, with these prune.reconstruct values")  # fmt: skip
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch
    from safetensors.torch import save_file

    from prunekit.models.loading import load_config
    from prunekit.pipeline.params import load_params

    params = load_params(args.params)
    models = [Path(m) for m in (args.model or [str(ROOT / "models/base")])]
    with tempfile.TemporaryDirectory(prefix="offload-memory-") as tmp:
        work = Path(tmp)
        models += [random_model(shape, work) for shape in args.shape]
        rows, prune_rows = [], []
        for model in models:
            cfg = load_config(model)
            gen = torch.Generator().manual_seed(params.seed)
            ids = torch.randint(0, cfg.vocab_size, (params.calibrate.samples, params.calibrate.seq_len), generator=gen)
            calibration = work / f"{model.name}-calibration.safetensors"
            save_file({"input_ids": ids}, str(calibration))
            n_params = None
            for criterion in args.criteria:
                result = {}
                for mode in ("none", "layerwise"):
                    out = work / f"{model.name}-{criterion}-{mode}.safetensors"
                    job = dict(model=str(model), criterion=criterion, mode=mode, device=args.device,
                               calibration=str(calibration), out=str(out), params=args.params)  # fmt: skip
                    result[mode] = run_child(job)
                    print(f"{model.name} {criterion} {mode}: {result[mode]}", file=sys.stderr)
                if n_params is None:
                    from safetensors import safe_open

                    n_params = 0
                    for f in model.glob("*.safetensors"):
                        with safe_open(str(f), "pt") as h:
                            n_params += sum(_numel(h, k) for k in h.keys())
                diff = largest_difference(
                    work / f"{model.name}-{criterion}-none.safetensors",
                    work / f"{model.name}-{criterion}-layerwise.safetensors",
                )
                rows.append((model.name, n_params, criterion, result, diff))
            for reconstruct in args.prune:
                result = {}
                for mode in ("none", "layerwise"):
                    out = work / f"{model.name}-prune-{reconstruct}-{mode}"
                    job = dict(stage="prune", model=str(model), criterion=args.criteria[0], mode=mode,
                               device=args.device, calibration=str(calibration), out=str(out), params=args.params,
                               scores=str(work / f"{model.name}-{args.criteria[0]}-none.safetensors"),
                               reconstruct=reconstruct)  # fmt: skip
                    result[mode] = run_child(job)
                    print(f"{model.name} prune {reconstruct} {mode}: {result[mode]}", file=sys.stderr)
                diff = largest_weight_difference(
                    work / f"{model.name}-prune-{reconstruct}-none" / "model",
                    work / f"{model.name}-prune-{reconstruct}-layerwise" / "model",
                )
                prune_rows.append((model.name, n_params, reconstruct, result, diff))

    print(f"\nscore stage, {params.calibrate.samples} x {params.calibrate.seq_len} calibration tokens, "
          f"model.dtype {params.model.dtype}, device {args.device}, threads {torch.get_num_threads()}\n")  # fmt: skip
    table(rows, "criterion", "max rel. score diff")
    if prune_rows:
        p = params.prune
        print(f"\nprune stage: prune.target {p.target}, units {', '.join(p.units)}, {p.allocation}, skip "
              f"{p.skip_first} + {p.skip_last}, scores of {args.criteria[0]}\n")  # fmt: skip
        table(prune_rows, "reconstruct", "max abs. weight diff")


def table(rows: list[tuple], setting: str, difference: str) -> None:
    """Markdown rows (model, parameters, ``setting``, results of both modes, ``difference``), ratios side by side."""
    print(f"| model | params | {setting} | in memory: peak MiB (stage) | layerwise: peak MiB (stage) | "
          f"peak ratio | stage ratio | seconds in memory / layerwise | {difference} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, value, r, diff in rows:
        a, b = r["none"], r["layerwise"]
        print(
            f"| {name} | {n / 1e6:.0f}M | {value} | {a['peak_mib']:.0f} ({a['stage_mib']:.0f}) | "
            f"{b['peak_mib']:.0f} ({b['stage_mib']:.0f}) | {b['peak_mib'] / a['peak_mib']:.3f} | "
            f"{b['stage_mib'] / a['stage_mib']:.3f} | {a['seconds']:.1f} / {b['seconds']:.1f} | {diff:.1e} |"
        )


def _numel(handle, key: str) -> int:  # noqa: ANN001
    n = 1
    for d in handle.get_slice(key).get_shape():
        n *= d
    return n


if __name__ == "__main__":
    main()
