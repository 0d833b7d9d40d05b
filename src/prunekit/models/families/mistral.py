"""Mistral: Llama's layout (sliding-window attention is a run-time setting, not a size)."""

from __future__ import annotations

from transformers.models.mistral import modeling_mistral

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class MistralAdapter(ModelAdapter):
    """Mistral: Llama's layout; its stock config has no switch for o_proj / down_proj biases. llama.cpp runs it as
    ``llama`` (its GGUF files say ``llama`` too, so they convert as the Llama family)."""

    family = "mistral"
    model_types = ("mistral",)
    modeling = modeling_mistral
    prefix = "Mistral"
    llama_cpp_arch = "llama"
    llama_cpp_per_layer_arch = "deci"
    llama_cpp_output_bias = True
    llama_cpp_rope_types = ("default", "llama3")  # llama3 scaling travels as llama.cpp's rope_freqs


ADAPTERS.register(MistralAdapter.family)(MistralAdapter())
