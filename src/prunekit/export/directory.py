"""The GGUF file (and LoRA file) of a Hugging Face model directory: the export stage's and ``prunekit export``'s
one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.export.gguf import write_gguf
from prunekit.export.lora import lora_tensors, read_lora, write_lora_gguf
from prunekit.export.tensor_types import TensorTypes
from prunekit.export.tokenizer import TOKENIZER_GGUF


def export_directory(
    model_dir: Path,
    out: Path,
    types: TensorTypes,
    *,
    tokenizer_gguf: Path | None = None,
    tokenizer_pre: str | None = None,
    lora: Path | None = None,
    lora_out: Path | None = None,
) -> dict[str, Any]:
    """Write the GGUF file of a Hugging Face model directory (pruned, recovered or any supported one); the
    tokenizer from ``tokenizer_gguf`` when given (else ``model_dir``'s ``tokenizer.gguf`` if it has one, else
    built from its tokenizer.json); with ``lora`` (a peft adapter directory), its LoRA file at ``lora_out`` too.
    Returns :func:`write_gguf`'s summary (and ``lora``: :func:`write_lora_gguf`'s)."""
    from prunekit.models.loading import load_model

    types.check()
    if tokenizer_gguf is not None and not tokenizer_gguf.is_file():
        raise PrunekitError(f"tokenizer GGUF '{tokenizer_gguf}' does not exist")
    if (lora is None) != (lora_out is None):
        raise PrunekitError("a LoRA adapter export needs both the adapter directory and the file to write")
    adapters = read_lora(lora) if lora is not None else None  # before loading the model
    if tokenizer_gguf is None and (model_dir / TOKENIZER_GGUF).is_file():
        tokenizer_gguf = model_dir / TOKENIZER_GGUF
    model, _, adapter = load_model(model_dir, "float32", "cpu")
    name = str(getattr(model.config, "_name_or_path", "") or model_dir.name)
    prepared = lora_tensors(model, adapter, adapters) if adapters is not None else None  # every check before a file
    summary = write_gguf(
        model, adapter, out, types, name=name, tokenizer_gguf=tokenizer_gguf, hf_dir=model_dir,
        tokenizer_pre=tokenizer_pre,
    )  # fmt: skip
    if prepared is not None and lora_out is not None:
        summary["lora"] = write_lora_gguf(prepared, lora_out)
    return summary
