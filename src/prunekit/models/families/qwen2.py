"""Qwen2 (Qwen2, Qwen2.5): Llama's layout with q/k/v biases (sliced with their rows by the unit types)."""

from __future__ import annotations

from typing import Any

from transformers.models.qwen2 import modeling_qwen2

from prunekit.models.adapters import ADAPTERS, ModelAdapter
from prunekit.models.types import CausalLM


class Qwen2Adapter(ModelAdapter):
    """Qwen2: q/k/v biases; its stock config has no switch for o_proj / down_proj biases."""

    family = "qwen2"
    model_types = ("qwen2",)
    modeling = modeling_qwen2
    prefix = "Qwen2"
    gguf_architectures = ("qwen2",)
    llama_cpp_arch = "qwen2"
    llama_cpp_per_layer_arch = "deci"  # it reads q/k/v, o_proj and down_proj biases too

    def llama_cpp_uniform_refusal(self, model: CausalLM, sizes: list[Any]) -> str | None:
        # llama.cpp's qwen2 graph sizes q_proj by the embedding width.
        if sizes[0].num_attention_heads * self.head_dim(model) != model.config.hidden_size:
            return "its query heads x head_dim differ from the hidden size, which that graph sizes q_proj by"
        return None


ADAPTERS.register(Qwen2Adapter.family)(Qwen2Adapter())
