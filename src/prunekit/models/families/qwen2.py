"""Qwen2: Llama's layout with q/k/v biases (sliced with their rows by the unit types)."""

from __future__ import annotations

from transformers.models.qwen2 import modeling_qwen2

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class Qwen2Adapter(ModelAdapter):
    """Qwen2: q/k/v biases; its stock config has no switch for o_proj / down_proj biases."""

    family = "qwen2"
    model_types = ("qwen2",)
    modeling = modeling_qwen2
    prefix = "Qwen2"


ADAPTERS.register(Qwen2Adapter.family)(Qwen2Adapter())
