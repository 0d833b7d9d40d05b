"""Mistral: Llama's layout (sliding-window attention is a run-time setting, not a size)."""

from __future__ import annotations

from transformers.models.mistral import modeling_mistral

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class MistralAdapter(ModelAdapter):
    """Mistral: Llama's layout; its stock config has no switch for o_proj / down_proj biases."""

    family = "mistral"
    model_types = ("mistral",)
    modeling = modeling_mistral
    prefix = "Mistral"


ADAPTERS.register(MistralAdapter.family)(MistralAdapter())
