"""Size and cost of a (pruned) decoder from its per-layer sizes: MACs per token and KV-cache bytes per token.

Per decoder layer with hidden size h, n_q query heads, n_kv key/value heads, query/key head width d_qk,
value head width d_v (they differ only after TransAct's within-head pruning) and MLP width m:

    projections  h * n_q * d_qk  (q)  +  h * n_kv * d_qk  (k)  +  h * n_kv * d_v  (v)  +  n_q * d_v * h  (o)
    MLP          3 * h * m                                       (gate, up, down)
    attention    n_q * (d_qk + d_v)  per token of context        (q . k scores, then the weighted sum of v)

plus the LM head, h * vocab. A token attending to c earlier positions (itself included) costs
``linear_macs_per_token + c * attention_macs_per_context_token``; over a causal chunk of L tokens the
mean context is (L + 1) / 2, which gives ``macs_per_token_at_<L>``. Norms, rotary embeddings, softmax and
the SiLU gate are O(h) per token and left out, as LLM-Pruner's and FLAP's MAC counts leave them out.

The KV cache holds, per token and layer, n_kv * (d_qk + d_v) numbers in the activation dtype (the
embedding output's dtype: float32 here, bfloat16 / float16 for half-precision models, also when the
weights are quantized).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM


@dataclass(frozen=True)
class LayerCost:
    """MACs per token of one decoder layer (linear part) and per context token (attention part)."""

    linear: int
    attention_per_context: int
    kv_numbers_per_token: int


def layer_costs(model: CausalLM, adapter: ModelAdapter) -> list[LayerCost]:
    """The cost of every decoder layer, from its sizes (:meth:`ModelAdapter.all_layer_sizes`)."""
    hidden = model.get_input_embeddings().embedding_dim
    default_head = adapter.head_dim(model)
    out = []
    for sizes in adapter.all_layer_sizes(model):
        d_qk = sizes.qk_head_dim or default_head
        d_v = sizes.v_head_dim or default_head
        n_q, n_kv, m = sizes.num_attention_heads, sizes.num_key_value_heads, sizes.intermediate_size
        linear = hidden * (n_q * d_qk + n_kv * d_qk + n_kv * d_v) + n_q * d_v * hidden + 3 * hidden * m
        out.append(LayerCost(linear, n_q * (d_qk + d_v), n_kv * (d_qk + d_v)))
    return out


def efficiency(model: CausalLM, adapter: ModelAdapter, seq_lens: list[int]) -> dict[str, int | float]:
    """MACs per token (linear, per context token, and mean over a causal chunk of each length) and KV bytes."""
    costs = layer_costs(model, adapter)
    emb = model.get_input_embeddings()
    head = emb.embedding_dim * emb.num_embeddings  # the LM head: h x vocab
    linear = sum(c.linear for c in costs) + head
    attention = sum(c.attention_per_context for c in costs)
    # The KV cache holds the hidden states' dtype: the embedding's output (a quantized embedding's ``dtype``).
    kv_element = torch.empty((), dtype=emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype).element_size()
    out: dict[str, int | float] = {
        "layers": len(costs),
        "linear_macs_per_token": linear,
        "attention_macs_per_context_token": attention,
    }
    for seq_len in seq_lens:
        out[f"macs_per_token_at_{seq_len}"] = linear + attention * (seq_len + 1) / 2
    out["kv_cache_bytes_per_token"] = sum(c.kv_numbers_per_token for c in costs) * kv_element
    return out


_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's max allocated, or the process's VmHWM on Linux (via ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(peak since :func:`reset_peak_memory`, what it measures) in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M) if _STATUS.exists() else None
    if match is None:
        raise RuntimeError("peak resident memory needs Linux /proc/self/status (VmHWM)")
    return int(match.group(1)) / 1024, "process peak resident set (VmHWM)"
