"""Qwen2: Llama's layout with q/k/v biases (sliced with their rows by the unit types)."""

from __future__ import annotations

from typing import Any

from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model

from prunekit.models.adapters import ADAPTERS, ModelAdapter
from prunekit.models.attention import HeadDimAttention
from prunekit.models.modeling import PerLayerCausalLM, PerLayerModel, check_layer_sizes


class HeadDimQwen2Attention(HeadDimAttention, modeling_qwen2.Qwen2Attention):
    family_module = modeling_qwen2

    def attention_kwargs(self) -> dict[str, Any]:
        return {"sliding_window": self.sliding_window}


class PrunedQwen2Config(Qwen2Config):
    """Qwen2Config with per-layer sizes (``layer_sizes``)."""

    model_type = "prunekit_qwen2"
    layer_sizes: list | None = None

    def validate_architecture(self) -> None:
        check_layer_sizes(self)


class PrunedQwen2Model(PerLayerModel, Qwen2Model):
    config_class = PrunedQwen2Config
    decoder_layer_cls = Qwen2DecoderLayer
    attention_cls = HeadDimQwen2Attention


class PrunedQwen2ForCausalLM(PerLayerCausalLM, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config
    base_model_cls = PrunedQwen2Model


class Qwen2Adapter(ModelAdapter):
    """Qwen2: q/k/v biases; its stock config has no switch for o_proj / down_proj biases."""

    family = "qwen2"
    model_types = ("qwen2",)
    stock_classes = (Qwen2Config, Qwen2ForCausalLM)
    pruned = (PrunedQwen2Config, PrunedQwen2Model, PrunedQwen2ForCausalLM)
    head_dim_attention = HeadDimQwen2Attention


ADAPTERS.register(Qwen2Adapter.family)(Qwen2Adapter())
