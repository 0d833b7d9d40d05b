"""The `prunekit` command: registered names, a model's shape, the run's summary, reports, the Prefect server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from prunekit.errors import PrunekitError


def cmd_list() -> None:
    from prunekit.data.sources import describe_sources
    from prunekit.models.families import ADAPTERS
    from prunekit.models.sources import SOURCES
    from prunekit.pruning.allocations import ALLOCATIONS
    from prunekit.pruning.criteria import CRITERIA
    from prunekit.pruning.schedules import SCHEDULES
    from prunekit.pruning.units import UNITS
    from prunekit.quant import SCHEMES

    def first_line(obj: object) -> str:
        lines = (obj.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""

    sections = [
        ("criteria (score.criterion)", [(n, first_line(c)) for n, c in CRITERIA.items()]),
        ("units (prune.units)", [(n, u.description) for n, u in UNITS.items()]),
        ("allocations (prune.allocation)", [(n, first_line(a)) for n, a in ALLOCATIONS.items()]),
        ("schedules (prune.schedule)", [(n, first_line(s)) for n, s in SCHEDULES.items()]),
        ("data sources (data.calibration / training / evaluation)", describe_sources()),
        ("model sources (model.source)", [(n, s.syntax) for n, s in SOURCES.items()]),
        (
            "model families (config model_type / GGUF architecture)",
            [(n, describe_family(a)) for n, a in ADAPTERS.items()],
        ),
        (
            "quantization schemes (search.choices)",
            [(n, f"{s.bits:>2} bits  {s.description}") for n, s in SCHEMES.items()],
        ),
    ]
    for title, rows in sections:
        print(title)
        width = max((len(n) for n, _ in rows), default=0)
        for name, desc in rows:
            print(f"  {name:<{width}}  {desc}")
        print()


def describe_family(adapter: Any) -> str:
    """One line of what a family reads, prunes and exports (its declarations, see ModelAdapter)."""
    from prunekit.pruning.units import UNITS

    units = adapter.supported_units(UNITS.names())
    refused = [*adapter.refused_units, *(f"criterion {c}" for c in adapter.refused_criteria)]
    refused += ["bias_compensation"] * bool(adapter.compensation_refused)
    refused += ["reconstruct"] * bool(adapter.reconstruction_refused)
    per_layer = adapter.llama_cpp_per_layer_arch
    export = f"{adapter.llama_cpp_arch}, per-layer widths as {per_layer}" if per_layer else (
        f"{adapter.llama_cpp_arch}, the same widths in every layer only")  # fmt: skip
    return (
        f"{', '.join(adapter.model_types)} / {', '.join(adapter.gguf_architectures) or '-'}; units: "
        f"{' '.join(units)}; refuses: {', '.join(refused) or 'nothing'}; llama.cpp: {export}"
    )


def cmd_info(model_dir: str) -> None:
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import library_versions
    from prunekit.models.size import count_params, weight_bytes

    model, _, adapter = load_model(model_dir)
    cfg = model.config
    print(f"model:        {model_dir}")
    print(f"architecture: {type(model).__name__} (model_type {cfg.model_type}, family {adapter.family})")
    print(f"hidden size:  {cfg.hidden_size}   head_dim: {adapter.head_dim(model)}   vocab: {cfg.vocab_size}")
    print(f"parameters:   {count_params(model):,}")
    print(f"weight bytes: {weight_bytes(model):,} ({next(model.parameters()).dtype})")
    print("layer  q_heads  kv_heads  intermediate")
    for i, s in enumerate(adapter.all_layer_sizes(model)):
        print(f"{i:>5}  {s.num_attention_heads:>7}  {s.num_key_value_heads:>8}  {s.intermediate_size:>12}")
    print("installed:    " + ", ".join(f"{k} {v}" for k, v in library_versions().items()))


def read_dvc_json(saved: str | None, command: str, repo: str = ".") -> Any:
    """A saved ``dvc <command> --json`` output, or that command's output in ``repo`` (``saved`` None)."""
    import json
    from pathlib import Path

    from prunekit.evaluation.report import dvc_json

    if saved is None:
        return dvc_json(Path(repo), *command.split())
    try:
        return json.loads(Path(saved).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrunekitError(f"cannot read `dvc {command} --json` output from '{saved}': {e}") from e


def cmd_summary(json_path: str | None) -> None:
    from prunekit.evaluation.summary import model_rows, summary_table

    print(summary_table(model_rows(read_dvc_json(json_path, "metrics show"))), end="")


def cmd_server(action: str) -> None:
    from prunekit.pipeline.prefect_server import server_status, state_dir, stop_server

    if action == "stop":
        url = stop_server()
        print(f"stopped the shared Prefect server at {url}" if url else "no shared Prefect server is running")
        return
    status = server_status()
    if status is None:
        print(f"no shared Prefect server is running (state: {state_dir()})")
    else:
        print(f"shared Prefect server at {status['url']} (pid {status['pid']}), stages attached: {status['clients']}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a GGUF file of a model directory (pruned, recovered or any supported one) for llama.cpp."""
    from pathlib import Path

    from prunekit.export.directory import export_directory
    from prunekit.export.tensor_types import choose_types
    from prunekit.quant.saving import ADAPTER_DIR

    labels = {"default": "--type", "embedding": "--embedding", "output": "--output"}
    types = choose_types(args.type if args.plan is None else "plan", Path(args.plan) if args.plan else None,
                         unplanned=args.type, embedding=args.embedding, output=args.output, labels=labels)  # fmt: skip
    tokenizer = Path(args.tokenizer_gguf) if args.tokenizer_gguf else None
    lora = Path(args.lora) if args.lora else None
    if lora is not None and (lora / ADAPTER_DIR).is_dir():  # a quantized model directory: its adapters
        lora = lora / ADAPTER_DIR
    lora_out = Path(args.lora_out) if args.lora_out else (Path(args.out).with_suffix(".lora.gguf") if lora else None)
    summary = export_directory(Path(args.model_dir), Path(args.out), types, tokenizer_gguf=tokenizer,
                               tokenizer_pre=args.tokenizer_pre, lora=lora, lora_out=lora_out)  # fmt: skip
    kinds = ", ".join(f"{n} {k}" for k, n in summary["tensor_types"].items())
    print(f"wrote {args.out}: {summary['architecture']}, {summary['bytes']:,} bytes ({kinds})")
    if "lora" in summary:
        s = summary["lora"]
        print(f"wrote {lora_out}: LoRA on {s['adapted_weights']} weights, rank {s['rank']}, {s['bytes']:,} bytes")


REPORT = "reports/experiments.md"  # the experiment comparison: written here only (`prunekit report`, the flow)


def cmd_report(json_path: str | None, out: str = REPORT, repo: str = ".") -> str:
    """Write the comparison of every experiment of ``repo`` (markdown ``out`` and a PNG beside it); return it."""
    from pathlib import Path

    from prunekit.evaluation.report import build_report

    text = build_report(read_dvc_json(json_path, "exp show", repo), Path(repo) / out)
    print(f"wrote {out} and {Path(out).with_suffix('.png')}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print every registered criterion, unit, allocation, data source, family")
    info = sub.add_parser("info", help="print architecture, per-layer widths, parameters and bytes of a model")
    info.add_argument("model_dir")
    report = sub.add_parser("report", help="markdown + PNG comparison of the DVC experiments (dvc exp show --json)")
    report.add_argument("--json", help="a saved `dvc exp show --json` output (default: run it here)")
    report.add_argument("--out", default=REPORT, help="markdown path (the PNG goes beside it)")
    summary = sub.add_parser("summary", help="one row per evaluated model: size, perplexity, accuracy, speed")
    summary.add_argument("--json", help="a saved `dvc metrics show --json` output (default: run it here)")
    export = sub.add_parser("export", help="write a model directory as a GGUF file for llama.cpp")
    export.add_argument("model_dir")
    export.add_argument("--format", choices=["gguf"], default="gguf")
    export.add_argument("--out", required=True, help="the .gguf file to write")
    export.add_argument("--plan", help="a quantization plan (data/quant_plan.json or a quantized model directory)")
    export.add_argument("--type", default="F16", help="every weight's type, or those the plan leaves out (F16)")
    export.add_argument("--embedding", help="the token embedding's type (default: the plan's, else --type)")
    export.add_argument("--output", help="an untied output head's type (default: the plan's, else the embedding's)")
    export.add_argument("--tokenizer-gguf", help="a GGUF file whose tokenizer fields to copy (default: built)")
    export.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name for a built tokenizer")
    export.add_argument("--lora", help="peft LoRA adapters (a directory, or a quantized model directory's adapter/) "
                        "to write as llama.cpp's LoRA file")  # fmt: skip
    export.add_argument("--lora-out", help="the LoRA file to write (default: OUT with .lora.gguf)")
    server = sub.add_parser("server", help="the shared local Prefect server the stages report to")
    server.add_argument("action", choices=["status", "stop"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "list":
            cmd_list()
        elif args.command == "report":
            cmd_report(args.json, args.out)
        elif args.command == "summary":
            cmd_summary(args.json)
        elif args.command == "server":
            cmd_server(args.action)
        elif args.command == "export":
            cmd_export(args)
        else:
            cmd_info(args.model_dir)
    except PrunekitError as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
