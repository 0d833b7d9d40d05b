"""Each stage's time and peak memory through `dvc repro`, and a QLoRA step against a LoRA step on the same model.

    python benchmarks/stage_times.py [--shape default qwen2.5-0.5b] [--criterion bip] [--work DIR]

For each model: a fresh Git + DVC repository with the project's dvc.yaml, stages and committed params.yaml
(`score.criterion` set to `--criterion`), `dvc repro` from nothing, and per stage the wall time, the time of its
work, and the process's peak resident memory (VmHWM), as each stage logs them. `default` is the embedded default
model (`model.source` of params.yaml); a published shape (`qwen2.5-0.5b`: 24 layers, hidden 896, MLP 4864, 2 KV
heads) gets seeded random weights in bfloat16 and the default model's tokenizer (random weights prune and train as
fast as real ones).

Then, on each run's recovered model with its searched quantization plan: the mean time of a training step of
LoRA on the float model, and of QLoRA on the plan's quantized model with the frozen weights decoded on every pass
and decoded once (`quantize.lora.decode`), all with `quantize.lora`'s batch and sequence length, measured one
after the other in this process (the first step of each is left out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_repo(folder: Path, source: str, criterion: str) -> Path:
    """A Git + DVC repository of the project's pipeline on ``source``."""
    repo = folder / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "flows", "src/prunekit"):  # dvc.yaml's deps include the library code
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["source"] = source
    params["score"]["criterion"] = criterion
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def shaped_model(shape: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A model of a published shape with seeded random weights (bfloat16) and the tokenizer of ``tokenizer_dir``."""
    from offload_memory import random_model

    out = random_model(shape, folder)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out


DONE = re.compile(r"stage (\S+) done in ([\d.]+) s \(work ([\d.]+) s, Prefect [\d.]+ s, peak ([\d.]+) MiB resident")


def repro(repo: Path) -> tuple[list[tuple[str, float, float, float]], float]:
    """``dvc repro`` of ``repo``: (stage, seconds, work seconds, peak MiB) per stage run, and the total seconds."""
    start = time.perf_counter()
    out = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True)
    total = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"dvc repro failed in {repo}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    text = out.stdout + out.stderr
    names = re.findall(r"Running stage '([^']+)'", text)
    rows = [(n, float(t), float(w), float(m)) for n, t, w, m in DONE.findall(text)]
    return [(names[i] if i < len(names) else r[0], *r[1:]) for i, r in enumerate(rows)], total


def step_times(repo: Path) -> dict[str, float]:
    """Mean seconds of a LoRA step on the recovered model and of QLoRA steps on its quantized plan."""
    import torch

    from prunekit.data.tokens import chunks, token_stream
    from prunekit.models.loading import load_model
    from prunekit.pipeline.inputs import read_documents
    from prunekit.pipeline.params import load_params
    from prunekit.quant.backend import lora_custom_modules
    from prunekit.quant.frozen import decoded_once
    from prunekit.quant.plan import read_plan
    from prunekit.quant.realise import realise
    from prunekit.quant.schemes import QuantSettings
    from prunekit.training.lora import LoraSettings, LoraTrainer, attach_lora

    params = load_params(repo / "params.yaml")
    q = params.quantize
    plan, _, _ = read_plan(repo / "data/quant_plan.json")
    steps = 4  # three gaps between four steps' backward passes
    settings = LoraSettings.from_params(q.lora, params.seed, "quantize.lora")
    settings = dataclasses.replace(settings, steps=steps)
    _, tokenizer, _ = load_model(repo / "models/recovered")
    stream = token_stream(tokenizer, read_documents(repo / "data/text", "training"))
    blocks = chunks(stream, q.lora.seq_len, "training")[: q.lora.batch_size * steps]
    torch.set_num_threads(params.runtime.threads or torch.get_num_threads())

    def timed(model: torch.nn.Module, custom: dict | None) -> float:
        """Mean seconds between the backward passes of consecutive steps (one update and one step's passes)."""
        stamps: list[float] = []
        peft_model = attach_lora(model, settings, custom)
        LoraTrainer(peft_model, blocks, settings).run("timing", between=lambda step, loss: stamps.append(
            time.perf_counter()))  # fmt: skip
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return sum(gaps) / len(gaps)

    out = {"lora (float)": timed(load_model(repo / "models/recovered")[0], None)}
    for mode in ("every_pass", "once"):
        model = realise(load_model(repo / "models/recovered")[0], plan, QuantSettings.from_params(q))
        with decoded_once(model, mode):
            out[f"qlora ({mode})"] = timed(model, lora_custom_modules())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["default", "qwen2.5-0.5b"])
    parser.add_argument("--criterion", default="bip")
    parser.add_argument("--work", type=Path, help="folder for the repositories (default: a temporary one, removed)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prunekit-stage-times-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    default_source = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["source"]
    default_repo = None
    try:
        for shape in args.shape:
            folder = work / shape
            if shape == "default":
                source = default_source
            else:
                if default_repo is None:
                    raise SystemExit("a published shape takes the default model's tokenizer: list 'default' first")
                source = str(shaped_model(shape, folder, default_repo / "models/base"))
            repo = make_repo(folder, source, args.criterion)
            rows, total = repro(repo)
            if shape == "default":
                default_repo = repo
            print(f"\n## {shape} (score.criterion {args.criterion}): dvc repro {total:.0f} s\n")
            print("| stage | seconds | work seconds | peak resident MiB |\n|---|---:|---:|---:|")
            for name, seconds, work_s, peak in rows:
                print(f"| {name} | {seconds:.1f} | {work_s:.1f} | {peak:.0f} |")
            times = step_times(repo)
            base = times["lora (float)"]
            print("\n| training step | seconds | / LoRA |\n|---|---:|---:|")
            for name, seconds in times.items():
                print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")
            sys.stdout.flush()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
