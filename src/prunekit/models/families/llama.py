"""Llama: the reference layout ``model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``.

One module per family: its adapter (where the layers, attention and MLP live), its head-dim attention, its
per-layer-width config and model classes, and the registration line.
"""

from __future__ import annotations

from transformers.models.llama import modeling_llama
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from prunekit.models.adapters import ADAPTERS, ModelAdapter
from prunekit.models.attention import HeadDimAttention
from prunekit.models.modeling import PerLayerCausalLM, PerLayerModel, check_layer_sizes


class HeadDimLlamaAttention(HeadDimAttention, modeling_llama.LlamaAttention):
    family_module = modeling_llama


class PrunedLlamaConfig(LlamaConfig):
    """LlamaConfig with per-layer sizes (``layer_sizes``); top-level sizes are the dense model's."""

    model_type = "prunekit_llama"
    layer_sizes: list | None = None

    def validate_architecture(self) -> None:
        # Stock Llama demands hidden_size % num_attention_heads == 0, which pruned heads need not meet
        # (head_dim is explicit); check what the pruned architecture needs instead.
        check_layer_sizes(self)


class PrunedLlamaModel(PerLayerModel, LlamaModel):
    config_class = PrunedLlamaConfig
    decoder_layer_cls = LlamaDecoderLayer
    attention_cls = HeadDimLlamaAttention


class PrunedLlamaForCausalLM(PerLayerCausalLM, LlamaForCausalLM):
    config_class = PrunedLlamaConfig
    base_model_cls = PrunedLlamaModel


class LlamaAdapter(ModelAdapter):
    """Llama (GQA included); its config switches ``attention_bias`` / ``mlp_bias`` give o_proj and down_proj biases."""

    family = "llama"
    model_types = ("llama",)
    stock_classes = (LlamaConfig, LlamaForCausalLM)
    pruned = (PrunedLlamaConfig, PrunedLlamaModel, PrunedLlamaForCausalLM)
    head_dim_attention = HeadDimLlamaAttention
    output_bias = True


ADAPTERS.register(LlamaAdapter.family)(LlamaAdapter())
