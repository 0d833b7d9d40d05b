"""Model-family adapters: where a family keeps its decoder layers, attention, MLP and their sizes.

Everything prunekit does to a model goes through an adapter, so supporting a family is one subclass
(its config ``model_type`` values and its pruned classes) plus the contract test in tests/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.modeling import LAYER_SIZE_KEYS, PRUNED_CLASSES
from prunekit.registry import Registry


@dataclass(frozen=True)
class LayerSizes:
    """The widths pruning changes in one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in LAYER_SIZE_KEYS}


class ModelAdapter:
    """Llama-style decoder: ``model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``."""

    family = "llama"
    model_types: tuple[str, ...] = ("llama",)
    attn_path = "self_attn"
    mlp_path = "mlp"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_decoder().layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attn_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_path)

    def head_dim(self, model: nn.Module) -> int:
        return int(self.attention(self.layers(model)[0]).head_dim)

    def layer_sizes(self, model: nn.Module, layer_idx: int) -> LayerSizes:
        """Read the sizes of one layer from its weights (the source of truth after slicing)."""
        layer = self.layers(model)[layer_idx]
        attn, mlp = self.attention(layer), self.mlp(layer)
        hd = int(attn.head_dim)
        return LayerSizes(
            num_attention_heads=getattr(attn, self.q).out_features // hd,
            num_key_value_heads=getattr(attn, self.k).out_features // hd,
            intermediate_size=getattr(mlp, self.gate).out_features,
        )

    def refresh_layer(self, layer: nn.Module) -> None:
        """Recompute attributes that modules derive from their sizes, after slicing."""
        attn = self.attention(layer)
        attn.num_key_value_groups = getattr(attn, self.q).out_features // getattr(attn, self.k).out_features

    def all_layer_sizes(self, model: nn.Module) -> list[LayerSizes]:
        return [self.layer_sizes(model, i) for i in range(len(self.layers(model)))]

    def pruned_classes(self) -> tuple[type, type, type]:
        return PRUNED_CLASSES[self.family]

    def stock_config(self, config: Any, sizes: LayerSizes) -> Any:
        """The family's stock config with uniform ``sizes``; raises ValueError if stock rejects them."""
        stock_cls = type(config).__mro__[1] if config.model_type.startswith("prunekit_") else type(config)
        data = config.to_dict()
        for key in ("layer_sizes", "model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        data.update(sizes.as_dict())
        data["head_dim"] = config.head_dim
        return stock_cls(**data)

    def pruned_config(self, config: Any, sizes: list[LayerSizes]) -> Any:
        """The family's prunekit config recording every layer's sizes."""
        config_cls = self.pruned_classes()[0]
        data = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        data["layer_sizes"] = [s.as_dict() for s in sizes]
        data["head_dim"] = config.head_dim
        return config_cls(**data)


class MistralAdapter(ModelAdapter):
    """Mistral: Llama's layout (sliding-window attention is a run-time setting, not a size)."""

    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(ModelAdapter):
    """Qwen2: Llama's layout with q/k/v biases (sliced with their rows by the units)."""

    family = "qwen2"
    model_types = ("qwen2",)


ADAPTERS: Registry[ModelAdapter] = Registry("model family")
for _adapter in (ModelAdapter(), MistralAdapter(), Qwen2Adapter()):
    ADAPTERS.register(_adapter.family)(_adapter)


def adapter_for(config: Any) -> ModelAdapter:
    """The adapter for a transformers config, or an error listing the supported architectures."""
    model_type = str(getattr(config, "model_type", ""))
    for _, adapter in ADAPTERS.items():
        pruned_type = adapter.pruned_classes()[0].model_type
        if model_type in adapter.model_types or model_type == pruned_type:
            return adapter
    supported = sorted(t for _, a in ADAPTERS.items() for t in a.model_types)
    raise PrunekitError(
        f"Unsupported architecture '{model_type}' (architectures: {getattr(config, 'architectures', None)}). "
        f"Supported model types: {', '.join(supported)}."
    )
