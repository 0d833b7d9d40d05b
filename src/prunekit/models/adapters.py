"""Model-family adapters: where a family keeps its decoder layers, attention, MLP and their sizes.

Everything prunekit does to a model goes through an adapter. A family is one module in
:mod:`prunekit.models.families`: a :class:`ModelAdapter` subclass naming its config ``model_type`` values, its
stock and per-layer-width classes and its head-dim attention, and one registration line; the contract tests
run over every registered family.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.modeling import LAYER_SIZE_KEYS, OUTPUT_BIAS, HeadDimAttention, PrunedClasses, pruned_classes
from prunekit.registry import Registry


@dataclass(frozen=True)
class LayerSizes:
    """The widths pruning changes in one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    # Within-head widths, only in layers whose head dims are pruned (None: stock attention, dense head_dim).
    qk_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_pairs: tuple[tuple[int, ...], ...] | None = None  # kept rotary pairs of each k/v head

    @property
    def head_dims_pruned(self) -> bool:
        return self.qk_head_dim is not None

    def as_dict(self) -> dict[str, Any]:
        """The config entry: keys left at None are omitted, so unpruned head dims write what they always did."""
        out = {k: getattr(self, k) for k in LAYER_SIZE_KEYS if getattr(self, k) is not None}
        if "rope_pairs" in out:
            out["rope_pairs"] = [list(p) for p in out["rope_pairs"]]
        return out


# Attribute of each decoder layer (set by ``ModelAdapter.layers``) through which paths such as
# ``"_prunekit_root.lm_head.weight"`` reach the layer's model.
ROOT_ATTR = "_prunekit_root"


class RootLink(nn.Module):
    """A weak, unregistered link from a decoder layer to its model.

    Stored in the layer's ``__dict__`` (not ``_modules``), so it is no submodule: it adds nothing to
    ``parameters()``, ``state_dict()`` or ``modules()``. The reference is weak so that a model is freed as
    soon as it is dropped (a strong one would make a cycle, freed only by the cyclic GC). Attribute access
    is forwarded to the model, which is what ``get_submodule`` / ``get_parameter`` walk.
    """

    def __init__(self, model: nn.Module | None) -> None:
        super().__init__()
        self.__dict__["_target"] = weakref.ref(model) if model is not None else None

    @property
    def target(self) -> nn.Module | None:
        """The linked model, or None if it was freed (or this link was copied without it)."""
        ref = self.__dict__["_target"]
        return ref() if ref is not None else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            return super().__getattr__(name)
        model = self.target
        if model is None:
            raise AttributeError(f"the model this decoder layer belonged to is gone (looking up {name!r})")
        return getattr(model, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> RootLink:
        # A deep copy of a model links its copied layers to the copied model (already in ``memo``).
        model = self.target
        return RootLink(memo.get(id(model), model) if model is not None else None)

    def __reduce__(self) -> tuple[type, tuple[None]]:
        # Weak references do not pickle; ``ModelAdapter.layers`` relinks the layers of a loaded model.
        return (RootLink, (None,))


class ModelAdapter:
    """Llama-style decoder: ``model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``.

    A family subclasses it (``prunekit.models.families``) and fills in the class attributes below; a family
    laid out differently also overrides the paths and accessors.
    """

    family = ""
    model_types: tuple[str, ...] = ()
    modeling: ModuleType  # the family's transformers modeling module (transformers.models.llama.modeling_llama)
    prefix = ""  # its class names' prefix: <prefix>Config, <prefix>ForCausalLM, <prefix>Attention, ...
    # The stock config has a switch for o_proj / down_proj biases (Llama's attention_bias / mlp_bias); families
    # without one get them through the pruned config's ``output_bias`` (FLAP's compensation needs them).
    output_bias = False
    attn_path = "self_attn"
    mlp_path = "mlp"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        layers = model.get_decoder().layers
        for layer in layers:
            # Model-wide units (units/hidden.py) own parameters outside any layer, and every caller
            # resolves members as ``layer.get_parameter(path)``: a layer names its model through this link.
            layer.__dict__[ROOT_ATTR] = RootLink(model)
        return layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attn_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_path)

    def head_dim(self, model: nn.Module) -> int:
        return int(self.attention(self.layers(model)[0]).head_dim)

    def qk_head_dim(self, attn: nn.Module) -> int:
        """Width of one query or key head: ``head_dim`` unless the layer's q/k dims are pruned."""
        return int(attn.qk_head_dim if isinstance(attn, HeadDimAttention) else attn.head_dim)

    def v_head_dim(self, attn: nn.Module) -> int:
        """Width of one value head (and of each query head's o_proj columns)."""
        return int(attn.v_head_dim if isinstance(attn, HeadDimAttention) else attn.head_dim)

    def layer_sizes(self, model: nn.Module, layer_idx: int) -> LayerSizes:
        """Read the sizes of one layer from its weights (the source of truth after slicing)."""
        layer = self.layers(model)[layer_idx]
        attn, mlp = self.attention(layer), self.mlp(layer)
        qk = self.qk_head_dim(attn)
        sizes = LayerSizes(
            num_attention_heads=getattr(attn, self.q).out_features // qk,
            num_key_value_heads=getattr(attn, self.k).out_features // qk,
            intermediate_size=getattr(mlp, self.gate).out_features,
        )
        if isinstance(attn, HeadDimAttention):
            sizes = replace(sizes, qk_head_dim=qk, v_head_dim=attn.v_head_dim, rope_pairs=attn.rope_pairs())
        return sizes

    def refresh_layer(self, layer: nn.Module) -> None:
        """Recompute attributes that modules derive from their sizes, after slicing."""
        attn = self.attention(layer)
        attn.num_key_value_groups = getattr(attn, self.q).out_features // getattr(attn, self.k).out_features

    def all_layer_sizes(self, model: nn.Module) -> list[LayerSizes]:
        return [self.layer_sizes(model, i) for i in range(len(self.layers(model)))]

    @property
    def stock_classes(self) -> tuple[type, type]:
        """(config, causal LM) of transformers."""
        return getattr(self.modeling, f"{self.prefix}Config"), getattr(self.modeling, f"{self.prefix}ForCausalLM")

    @property
    def pruned(self) -> PrunedClasses:
        """The family's classes with per-layer widths (config, base model, causal LM, head-dim attention)."""
        return pruned_classes(self.modeling, self.prefix)

    def enable_head_dims(self, attn: nn.Module) -> HeadDimAttention:
        """Turn the family's stock attention into its head-dim subclass in place: same weights, same outputs.

        The subclass adds only state (widths equal to head_dim, identity rotary index), so switching the class
        of the live module keeps its parameters, hooks and place in the model.
        """
        if isinstance(attn, HeadDimAttention):
            return attn
        cls = self.pruned.attention
        if type(attn) not in cls.__bases__:
            raise TypeError(f"cannot prune head dims of {type(attn).__name__}: expected the {self.family} attention")
        hd = int(attn.head_dim)
        kv = attn.k_proj.out_features // hd
        index = torch.arange(hd, device=attn.k_proj.weight.device).expand(kv, hd).clone()
        attn.__class__ = cls
        converted = cast(HeadDimAttention, attn)
        converted._set_head_dims(hd, hd, index)
        return converted

    def stock_config(self, config: Any, sizes: LayerSizes) -> Any:
        """The family's stock config with uniform ``sizes``; raises ValueError if stock rejects them."""
        if sizes.head_dims_pruned:
            raise ValueError("stock attention has one head_dim for q, k and v and no kept rotary pairs")
        if getattr(config, OUTPUT_BIAS, False):
            raise ValueError(f"the stock {self.family} config has no o_proj / down_proj biases")
        stock_cls = type(config).__mro__[1] if config.model_type.startswith("prunekit_") else type(config)
        data = config.to_dict()
        for key in ("layer_sizes", "model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        data.update(sizes.as_dict())
        data["head_dim"] = config_head_dim(config)
        return stock_cls(**data)

    def pruned_config(self, config: Any, sizes: list[LayerSizes]) -> Any:
        """The family's prunekit config recording every layer's sizes."""
        config_cls = self.pruned.config
        data = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            data.pop(key, None)
        data["layer_sizes"] = [s.as_dict() for s in sizes]
        data["head_dim"] = config_head_dim(config)
        return config_cls(**data)


def config_head_dim(config: Any) -> int:
    """A config's attention head width: ``head_dim`` where the config has one (Llama, Mistral), else
    hidden_size / heads, as transformers derives it (Qwen2 checkpoints ship no ``head_dim``)."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


ADAPTERS: Registry[ModelAdapter] = Registry("model family")


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` load pruned configs (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for _, adapter in ADAPTERS.items():
        config_cls, model_cls, causal_cls, _ = adapter.pruned
        if config_cls.model_type in CONFIG_MAPPING:
            continue
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModel.register(config_cls, model_cls)
        AutoModelForCausalLM.register(config_cls, causal_cls)


def supported_model_types() -> list[str]:
    """Every ``model_type`` a registered family reads (GGUF files name theirs the same way)."""
    return sorted(t for _, a in ADAPTERS.items() for t in a.model_types)


def adapter_for(config: Any) -> ModelAdapter:
    """The adapter for a transformers config, or an error listing the supported architectures."""
    model_type = str(getattr(config, "model_type", ""))
    for _, adapter in ADAPTERS.items():
        pruned_type = adapter.pruned.config.model_type
        if model_type in adapter.model_types or model_type == pruned_type:
            return adapter
    supported = supported_model_types()
    raise PrunekitError(
        f"Unsupported architecture '{model_type}' (architectures: {getattr(config, 'architectures', None)}). "
        f"Supported model types: {', '.join(supported)}."
    )


from prunekit.models import families  # noqa: E402, F401  (registers the families; they import this module)
