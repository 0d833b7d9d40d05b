"""GGUF files for llama.cpp, written with llama.cpp's own ``gguf`` package: metadata, tokenizer and tensors.

The architecture and row order: :mod:`prunekit.export.architecture`; the tensor types and their encoders:
:mod:`prunekit.export.tensor_types`, :mod:`prunekit.quant.gguf_types`; the tokenizer: :mod:`prunekit.export.tokenizer`.
Every 2-D weight gets the type the caller gives it (by module name), else the default; norms and biases stay F32.
Norm weights are stored as llama.cpp's graph reads them (Gemma's as 1 + w) and the family adds the metadata its
graph needs beyond the shared keys (:meth:`prunekit.models.adapters.ModelAdapter.gguf_metadata`).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.export.architecture import PAIR_ROPE_ARCHS, check_exportable, pair_rows
from prunekit.export.tensor_types import TensorTypes
from prunekit.export.tokenizer import add_tokenizer
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pipeline.outputs import atomic_file
from prunekit.quant.gguf_types import check_fits, encode, qtype

log = logging.getLogger(__name__)

K_FILE_TYPES = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
                "Q6_K": "MOSTLY_Q6_K"}  # fmt: skip


def _rope_factors(config: Any, params: dict[str, Any]) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (a divisor of each dense frequency) for llama3 rope scaling (``params``: the
    rotary settings), from transformers' own rope functions; None for other rotary types."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if params.get("rope_type", "default") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.head_dim
    base = float(params["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (plain / scaled.float()).to(torch.float32)


def _file_type(kinds: list[str]) -> int:
    """``general.file_type``: the type most 2-D weights have (llama.cpp's label of the file)."""
    import gguf

    most = max(set(kinds), key=kinds.count)
    if most == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    return int(gguf.LlamaFileType[K_FILE_TYPES.get(most, f"MOSTLY_{most}")])


def _write(
    writer: Any,
    model: CausalLM,
    adapter: ModelAdapter,
    arch: str,
    plan: list[tuple[str, torch.Tensor, str]],
    name: str,
    tokenizer: tuple[Path | None, Path | None, str | None],
) -> None:
    """Metadata, tokenizer (``(tokenizer_gguf, hf_dir, tokenizer_pre)``) and tensors of :func:`write_gguf`'s file."""
    import gguf

    config = model.config
    sizes = adapter.all_layer_sizes(model)
    head_dim = adapter.head_dim(model)
    writer.add_name(name)
    writer.add_block_count(len(sizes))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    per_layer = arch == adapter.llama_cpp_per_layer_arch
    for add, values in (
        (writer.add_feed_forward_length, [s.intermediate_size for s in sizes]),
        (writer.add_head_count, [s.num_attention_heads for s in sizes]),
        (writer.add_head_count_kv, [s.num_key_value_heads for s in sizes]),
    ):
        add(values if per_layer else values[0])  # arrays where layers differ, scalars where they agree
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = adapter.rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type([k for _, p, k in plan if p.dim() == 2]))
    adapter.gguf_metadata(writer, model)
    add_tokenizer(writer, int(config.vocab_size), *tokenizer)

    factors = _rope_factors(config, rope)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    for gname, p, kind in plan:
        w = p.detach()
        if arch in PAIR_ROPE_ARCHS and (".attn_q." in gname or ".attn_k." in gname):
            size = sizes[int(gname.split(".")[1])]
            w = pair_rows(w, size.num_attention_heads if ".attn_q." in gname else size.num_key_value_heads)
        data = encode(w, kind) if w.dim() == 2 else w.to(torch.float32).cpu().numpy()
        writer.add_tensor(gname, data, raw_dtype=None if kind in ("F32", "F16") else qtype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def write_gguf(
    model: CausalLM,
    adapter: ModelAdapter,
    out: Path,
    types: TensorTypes,
    *,
    name: str,
    tokenizer_gguf: Path | None = None,
    hf_dir: Path | None = None,
    tokenizer_pre: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (float weights, transformers layout) to ``out``; returns a summary (architecture, bytes,
    tensors per type). Nothing is left at ``out`` unless the whole file was written."""
    import gguf

    types.check()
    arch = check_exportable(model, adapter)
    config = model.config
    n_layers = len(adapter.layers(model))

    # Cheap checks first: every type fits its weight, every typed module exists, before a byte is written.
    plan: list[tuple[str, torch.Tensor, str]] = []  # (gguf name, tensor, type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for pname, p in model.named_parameters():
        if pname == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        gname = names.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise PrunekitError(f"GGUF export: no llama.cpp tensor for '{pname}'")
        role = {"token_embd.weight": "embedding", "output.weight": "output"}.get(gname, "weight")
        kind = "F32" if p.dim() == 1 else types.kind(pname.rsplit(".", 1)[0], role)
        if p.dim() == 2:
            check_fits(kind, p.shape[1], pname)
        plan.append((gname, adapter.gguf_tensor(pname, p.detach(), model), kind))
    unknown = sorted(set(types.tensors) - {pname.rsplit(".", 1)[0] for pname, _ in model.named_parameters()})
    if unknown:
        raise PrunekitError(
            f"GGUF export: the types name modules this model does not have ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); was the plan searched on another model? Rerun the search"
        )

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write(writer, model, adapter, arch, plan, name, (tokenizer_gguf, hf_dir, tokenizer_pre))
        finally:
            writer.close()
    counts = Counter(kind for _, _, kind in plan)
    log.info("wrote %s (%s, %.1f MiB): %s", out, arch, out.stat().st_size / 2**20, counts)
    return {"architecture": arch, "bytes": out.stat().st_size, "tensor_types": dict(sorted(counts.items()))}
