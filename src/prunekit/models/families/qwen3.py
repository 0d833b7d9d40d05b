"""Qwen3: Llama's layout with per-head q/k RMSNorms before RoPE and its own ``head_dim``.

``q_norm`` / ``k_norm`` normalise each query and key head over its ``head_dim`` dims with one weight shared by every
head; ``head_dim`` is a config value of its own (Qwen3-4B: 32 heads x 128 against a hidden size of 2560), so the
query width need not equal the hidden size. No q/k/v biases; the small sizes tie the embedding. Whole heads, KV
groups, MLP channels, v/o dims, hidden channels and layers prune exactly: the norms act inside one head.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from transformers.models.qwen3 import modeling_qwen3

from prunekit.models.adapters import ADAPTERS, QK_NORM_REFUSAL, ModelAdapter


class Qwen3Adapter(ModelAdapter):
    """Qwen3: q/k norms over each head, an explicit head_dim; no stock switch for a down_proj bias."""

    family = "qwen3"
    model_types = ("qwen3",)
    modeling = modeling_qwen3
    prefix = "Qwen3"
    gguf_architectures = ("qwen3",)
    llama_cpp_arch = "qwen3"  # its graph reads one head count and FFN width for all layers: no per-layer arch
    refused_units = MappingProxyType({"attn_qk_dim": QK_NORM_REFUSAL})

    def complete_gguf_config(self, config: Any, metadata: Mapping[str, Any], arch: str) -> None:
        # transformers reads no head_dim from a qwen3 GGUF file (its default, 128, is every released size's)
        key_length = metadata.get(f"{arch}.attention.key_length")
        if key_length is not None:
            config.head_dim = int(key_length)


ADAPTERS.register(Qwen3Adapter.family)(Qwen3Adapter())
