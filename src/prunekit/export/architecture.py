"""Which llama.cpp architecture a model is written as (what its family declares), and llama.cpp's row order.

A model whose decoder layers all keep the same widths is written as its family's llama.cpp architecture (``llama``
for Llama and Mistral, ``qwen2`` for Qwen2 while its query heads span the embedding width, ``qwen3``, ``gemma3``);
one whose layers differ as the architecture the family declares for per-layer widths (``deci``, llama.cpp's Llama
variant with per-layer ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` arrays,
which also reads q/k/v, o_proj and down_proj biases), or it is refused with what to set instead. ``llama`` and
``deci`` rotate consecutive pairs of a head's dims, so the rows of q_proj and k_proj (and of their LoRA ``B``) are
permuted from transformers' two halves to pairs; the others rotate halves, as transformers does.

Not exported (a clear error names the cause): pruned head dims (llama.cpp has one key / value width per model,
equal to the rotary width, and rotates the first frequencies, not kept ones), a sliding window shorter than the
context where the family's graph has none, rotary types the family's graph does not reproduce.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import HeadDimAttention
from prunekit.models.types import CausalLM

PAIR_ROPE_ARCHS = ("llama", "deci")  # llama.cpp archs whose rope rotates consecutive dims (the others: halves)


def check_exportable(model: CausalLM, adapter: ModelAdapter) -> str:
    """The llama.cpp architecture ``model`` is written as (what its family declares), or an error naming what
    llama.cpp cannot run and what to set instead."""
    config = model.config
    layers = adapter.layers(model)
    if any(isinstance(adapter.attention(layer), HeadDimAttention) for layer in layers):
        raise PrunekitError(
            "GGUF export: this model's head dims are pruned (prune.units attn_qk_dim / attn_vo_dim); llama.cpp has "
            "one key and value width, equal to the rotary width, for the whole model and rotates the first "
            "frequencies, not the kept ones. Prune heads, KV groups and MLP channels for a llama.cpp export"
        )
    arch = adapter.llama_cpp_arch
    if arch is None:
        raise PrunekitError(f"GGUF export: the {adapter.family} family has no llama.cpp architecture")
    window = getattr(config, "sliding_window", None)
    if not adapter.llama_cpp_sliding_window and window is not None and window < config.max_position_embeddings:
        raise PrunekitError(
            f"GGUF export: sliding_window {window} is shorter than the context ({config.max_position_embeddings}); "
            f"llama.cpp's {arch} graph attends to the whole context, so the file would compute something else "
            "beyond the window"
        )
    rope = adapter.rope_parameters(config).get("rope_type", "default")
    if rope not in adapter.llama_cpp_rope_types:
        raise PrunekitError(
            f"GGUF export: rope_type '{rope}' is not exported for the {adapter.family} family "
            f"({', '.join(adapter.llama_cpp_rope_types)} are)"
        )
    sizes = adapter.all_layer_sizes(model)
    reasons: list[tuple[str, str]] = []  # (why not the uniform architecture, what to set instead)
    if len(set(sizes)) > 1:
        reasons.append(("its layers keep different widths", _UNIFORM_CUT))
    if _has_output_bias(model, adapter) and not adapter.llama_cpp_output_bias:
        reasons.append(
            ("it has o_proj / down_proj biases, which that graph does not read", "prune.bias_compensation: false")
        )
    misfit = adapter.llama_cpp_uniform_refusal(model, sizes)
    if misfit is not None:
        reasons.append((misfit, _UNIFORM_CUT))
    if not reasons:
        return arch
    if adapter.llama_cpp_per_layer_arch is not None:
        return adapter.llama_cpp_per_layer_arch
    fixes = dict.fromkeys(fix for _, fix in reasons)
    raise PrunekitError(
        f"GGUF export: llama.cpp's {arch} graph reads one head count and FFN width for every layer, and the "
        f"{adapter.family} family has no llama.cpp architecture with per-layer widths; this model cannot be written as "
        f"{arch}: {'; '.join(why for why, _ in reasons)}. Set {' and '.join(fixes)}"
    )


# What to set for a model every layer of which a uniform-width llama.cpp architecture can hold.
_UNIFORM_CUT = "a uniform cut of all layers (prune.skip_first: 0, prune.skip_last: 0, prune.allocation: uniform)"


def _has_output_bias(model: CausalLM, adapter: ModelAdapter) -> bool:
    """Whether any o_proj or down_proj has a bias (FLAP's compensation, least squares, a Llama config switch)."""
    return any(
        getattr(adapter.attention(layer), adapter.o).bias is not None
        or getattr(adapter.mlp(layer), adapter.down).bias is not None
        for layer in adapter.layers(model)
    )


def pair_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from transformers' halves [x_0..x_{d/2-1}, y_0..] to pairs [x_0, y_0, x_1, ..]."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
