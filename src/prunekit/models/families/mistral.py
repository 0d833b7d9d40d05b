"""Mistral: Llama's layout (sliding-window attention is a run-time setting, not a size)."""

from __future__ import annotations

from typing import Any

from transformers.models.mistral import modeling_mistral
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM, MistralModel

from prunekit.models.adapters import ADAPTERS, ModelAdapter
from prunekit.models.attention import HeadDimAttention
from prunekit.models.modeling import PerLayerCausalLM, PerLayerModel, check_layer_sizes


class HeadDimMistralAttention(HeadDimAttention, modeling_mistral.MistralAttention):
    family_module = modeling_mistral

    def attention_kwargs(self) -> dict[str, Any]:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class PrunedMistralConfig(MistralConfig):
    """MistralConfig with per-layer sizes (``layer_sizes``)."""

    model_type = "prunekit_mistral"
    layer_sizes: list | None = None

    def validate_architecture(self) -> None:
        check_layer_sizes(self)


class PrunedMistralModel(PerLayerModel, MistralModel):
    config_class = PrunedMistralConfig
    decoder_layer_cls = MistralDecoderLayer
    attention_cls = HeadDimMistralAttention


class PrunedMistralForCausalLM(PerLayerCausalLM, MistralForCausalLM):
    config_class = PrunedMistralConfig
    base_model_cls = PrunedMistralModel


class MistralAdapter(ModelAdapter):
    """Mistral: Llama's layout; its stock config has no switch for o_proj / down_proj biases."""

    family = "mistral"
    model_types = ("mistral",)
    stock_classes = (MistralConfig, MistralForCausalLM)
    pruned = (PrunedMistralConfig, PrunedMistralModel, PrunedMistralForCausalLM)
    head_dim_attention = HeadDimMistralAttention


ADAPTERS.register(MistralAdapter.family)(MistralAdapter())
