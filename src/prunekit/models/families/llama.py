"""Llama (Llama 2, Llama 3.x, SmolLM2): the reference layout ``model.layers[i].{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj}``.

One module per family: its adapter (the family's transformers modeling module and class-name prefix, where the
layers, attention and MLP live, what it can do) and the registration line. The per-layer-width config and model
classes and the head-dim attention are made from the family's own classes
(:func:`prunekit.models.modeling.pruned_classes`).
"""

from __future__ import annotations

from transformers.models.llama import modeling_llama

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Llama (GQA included); its config switches ``attention_bias`` / ``mlp_bias`` give o_proj and down_proj biases."""

    family = "llama"
    model_types = ("llama",)
    modeling = modeling_llama
    prefix = "Llama"
    output_bias = True
    gguf_architectures = ("llama",)
    llama_cpp_arch = "llama"
    # deci: llama.cpp's Llama variant with per-layer head counts and FFN widths (Nemotron-NAS)
    llama_cpp_per_layer_arch = "deci"
    llama_cpp_output_bias = True
    llama_cpp_rope_types = ("default", "llama3")  # llama3 scaling travels as llama.cpp's rope_freqs


ADAPTERS.register(LlamaAdapter.family)(LlamaAdapter())
