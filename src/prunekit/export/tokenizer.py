"""The tokenizer fields of a GGUF file: copied from the GGUF file the model came from, or built from its
Hugging Face tokenizer (byte-level BPE as ``gpt2``, with its merges, special tokens and chat template; llama.cpp's
default pre-tokenizer unless ``tokenizer_pre`` names one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError

TOKENIZER_GGUF = "tokenizer.gguf"  # the base GGUF's tokenizer fields, beside a model converted from one


def copy_tokenizer(source: Path, writer: Any) -> int:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source`` to ``writer``; returns how many."""
    import gguf

    copied = 0
    for name, fld in gguf.GGUFReader(source).fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, fld.contents(), kind, sub_type=sub)
        copied += 1
    return copied


def write_tokenizer_gguf(source: Path, out: Path, architecture: str) -> int:
    """A GGUF file of ``source``'s tokenizer fields alone (no tensors): what a later export copies."""
    import gguf

    writer = gguf.GGUFWriter(out, architecture)
    copied = copy_tokenizer(source, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return copied


def add_tokenizer(
    writer: Any, vocab_size: int, tokenizer_gguf: Path | None, hf_dir: Path | None, tokenizer_pre: str | None
) -> None:
    """The tokenizer fields: copied from ``tokenizer_gguf`` when given, else built from the HF tokenizer."""
    import gguf

    if tokenizer_gguf is not None:
        if not copy_tokenizer(tokenizer_gguf, writer):
            raise PrunekitError(f"'{tokenizer_gguf}' holds no tokenizer fields; rerun the download stage")
        return
    if hf_dir is None or not (hf_dir / "tokenizer.json").is_file():
        raise PrunekitError(f"no tokenizer to export: '{hf_dir}' has no tokenizer.json")
    import json

    spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise PrunekitError(
            f"GGUF export: the tokenizer in '{hf_dir}' is {model.get('type')}"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}"
            f"{'' if byte_level else ' without a byte-level decoder'}; prunekit builds byte-level BPE tokenizers "
            "(GPT-2 style). Start from the model's GGUF file (model.source) to carry its tokenizer, or give a GGUF "
            "file of the same tokenizer (prunekit export --tokenizer-gguf)"
        )
    vocab = gguf.vocab.BpeVocab(hf_dir)
    tokens, _, kinds = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    if len(tokens) > vocab_size:
        raise PrunekitError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    # llama.cpp sizes the embedding by the token list: rows without a token get unused placeholders.
    pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    kinds += [gguf.TokenType.UNUSED] * pad
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise PrunekitError(f"GGUF export: the tokenizer in '{hf_dir}' has no BPE merges, which llama.cpp needs")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    special.add_to_gguf(writer, quiet=True)
