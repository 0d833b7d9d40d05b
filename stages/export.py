"""Stage `export`: the GGUF file of the recovered model for llama.cpp, in the searched plan's types."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def export(
    params: Params, model_dir: Path, base: Path, plan_file: Path, quantized: Path, out: Path, metrics: Path
) -> None:
    """Write ``out`` (GGUF) from ``model_dir`` with ``export``'s types: the plan's (``plan_file``) or one for
    every weight; the tokenizer from ``base``'s ``tokenizer.gguf`` when the model came from a GGUF file; with
    ``export.lora``, the QLoRA adapters of ``quantized`` (when it has them) as llama.cpp's LoRA file beside it."""
    from prunekit.export.directory import export_directory
    from prunekit.export.lora import ADAPTER_GGUF
    from prunekit.export.tensor_types import choose_types
    from prunekit.export.tokenizer import TOKENIZER_GGUF
    from prunekit.pipeline.outputs import write_json
    from prunekit.quant.saving import ADAPTER_DIR

    e = params.export
    labels = {"default": "export.unplanned" if e.types == "plan" else "export.types", "embedding": "export.embedding",
              "output": "export.output"}  # fmt: skip
    types = choose_types(e.types, plan_file, unplanned=e.unplanned, embedding=e.embedding, output=e.output,
                         labels=labels)  # fmt: skip
    tokenizer = base / TOKENIZER_GGUF
    lora = quantized / ADAPTER_DIR if e.lora and (quantized / ADAPTER_DIR).is_dir() else None
    summary = export_directory(model_dir, out, types, tokenizer_gguf=tokenizer if tokenizer.is_file() else None,
                               tokenizer_pre=e.tokenizer_pre, lora=lora,
                               lora_out=out.parent / ADAPTER_GGUF if lora else None)  # fmt: skip
    write_json(metrics, {"bytes": summary["bytes"], "architecture": summary["architecture"],
                         "tensor_types": summary["tensor_types"], "lora": summary.get("lora")})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--base", type=Path, required=True, help="the base model directory (its tokenizer.gguf)")
    parser.add_argument("--plan", type=Path, dest="plan_file", required=True, help="the searched quantization plan")
    parser.add_argument("--quantized", type=Path, required=True, help="the quantized model (its QLoRA adapters)")
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="bytes, architecture, tensors per type (.json)")
    return run_stage("export", parser, export, argv)


if __name__ == "__main__":
    exit_after(main)
