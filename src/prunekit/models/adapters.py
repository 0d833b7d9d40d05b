"""Model-family adapters: where a family keeps its decoder layers, attention, MLP and their sizes, and what it
can do.

Everything prunekit does to a model goes through an adapter. A family is one module in
:mod:`prunekit.models.families`: a :class:`ModelAdapter` subclass naming its config ``model_type`` values, its
stock and per-layer-width classes, what it supports (unit types, criteria, compensation, reconstruction, the
llama.cpp architectures it exports to) and one registration line; the package fills the registry
(:data:`ADAPTERS`) and looks families up (:func:`prunekit.models.families.adapter_for`). The contract tests run
over every registered family.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType, ModuleType
from typing import Any, cast

import torch
from torch import nn

from prunekit.models.modeling import (
    LAYER_SIZE_KEYS,
    OUTPUT_BIAS,
    ClassNames,
    HeadDimAttention,
    PrunedClasses,
    PrunedConfig,
    pruned_classes,
)
from prunekit.models.types import CausalLM, Submodule
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

    def __init__(self, model: CausalLM | None) -> None:
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
    laid out differently also overrides the paths and accessors. The second group of attributes declares what
    the family can do: params validation, the score and prune stages, the GGUF export, ``prunekit list`` and the
    docs read them, so nothing elsewhere tests a family's name.
    """

    family = ""
    model_types: tuple[str, ...] = ()
    modeling: ModuleType  # the family's transformers modeling module (transformers.models.llama.modeling_llama)
    prefix = ""  # the pruned classes' names: Pruned<prefix>Config, Pruned<prefix>ForCausalLM, HeadDim<prefix>Attention
    # The family's class names in ``modeling``; None: <prefix>Config, <prefix>Model, <prefix>ForCausalLM, ...
    classes: ClassNames | None = None
    # The stock config has a switch for o_proj / down_proj biases (Llama's attention_bias / mlp_bias); families
    # without one get them through the pruned config's ``output_bias`` (FLAP's compensation needs them).
    output_bias = False
    attn_path = "self_attn"
    mlp_path = "mlp"
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    # RMSNorms over the hidden size inside a decoder layer (a hidden channel lives in each of them).
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Norms compute x * (norm_offset + w): 0 for Llama's, 1 for Gemma's (llama.cpp stores norm_offset + w).
    norm_offset = 0.0

    # --- what the family can do -------------------------------------------------------------------------------
    # GGUF files whose ``general.architecture`` is one of these are converted by download_model.
    gguf_architectures: tuple[str, ...] = ()
    # llama.cpp's architecture for a GGUF export whose layers keep the same widths (None: no GGUF export) ...
    llama_cpp_arch: str | None = None
    # ... and the one whose graph reads per-layer head counts and FFN widths (None: per-layer widths refused).
    llama_cpp_per_layer_arch: str | None = None
    # Whether ``llama_cpp_arch`` reads o_proj / down_proj biases (bias compensation); if not, such a model is
    # written as ``llama_cpp_per_layer_arch`` (or refused without one).
    llama_cpp_output_bias = False
    # Unit types (``prune.units``) and criteria (``score.criterion``) this family refuses, with the reason.
    refused_units: Mapping[str, str] = MappingProxyType({})
    refused_criteria: Mapping[str, str] = MappingProxyType({})
    # Why ``prune.bias_compensation`` / ``prune.reconstruct`` are refused for this family (None: allowed).
    compensation_refused: str | None = None
    reconstruction_refused: str | None = None

    # Rotary types llama.cpp's graph for the family reproduces (``rope_type`` of :meth:`rope_parameters`).
    llama_cpp_rope_types: tuple[str, ...] = ("default",)
    # Whether that graph has sliding-window attention (else a window shorter than the context is refused).
    llama_cpp_sliding_window = False

    @property
    def class_names(self) -> ClassNames:
        return self.classes or ClassNames.of(self.prefix)

    def supported_units(self, units: list[str]) -> list[str]:
        """Those of ``units`` this family prunes."""
        return [u for u in units if u not in self.refused_units]

    def layers(self, model: CausalLM) -> nn.ModuleList:
        layers = model.get_decoder().layers
        for layer in layers:
            # Model-wide units (units/hidden.py) own parameters outside any layer, and every caller
            # resolves members as ``layer.get_parameter(path)``: a layer names its model through this link.
            layer.__dict__[ROOT_ATTR] = RootLink(model)
        return layers

    def attention(self, layer: Submodule) -> Submodule:
        return layer.get_submodule(self.attn_path)

    def mlp(self, layer: Submodule) -> Submodule:
        return layer.get_submodule(self.mlp_path)

    def head_dim(self, model: CausalLM) -> int:
        return int(self.attention(self.layers(model)[0]).head_dim)

    def qk_head_dim(self, attn: Submodule) -> int:
        """Width of one query or key head: ``head_dim`` unless the layer's q/k dims are pruned."""
        return int(attn.qk_head_dim if isinstance(attn, HeadDimAttention) else attn.head_dim)

    def v_head_dim(self, attn: Submodule) -> int:
        """Width of one value head (and of each query head's o_proj columns)."""
        return int(attn.v_head_dim if isinstance(attn, HeadDimAttention) else attn.head_dim)

    def layer_sizes(self, model: CausalLM, layer_idx: int) -> LayerSizes:
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

    def refresh_layer(self, layer: Submodule) -> None:
        """Recompute attributes that modules derive from their sizes, after slicing."""
        attn = self.attention(layer)
        attn.num_key_value_groups = getattr(attn, self.q).out_features // getattr(attn, self.k).out_features

    def all_layer_sizes(self, model: CausalLM) -> list[LayerSizes]:
        return [self.layer_sizes(model, i) for i in range(len(self.layers(model)))]

    @property
    def stock_classes(self) -> tuple[type, type]:
        """(config, causal LM) of transformers."""
        names = self.class_names
        return getattr(self.modeling, names.config), getattr(self.modeling, names.causal_lm)

    @property
    def pruned(self) -> PrunedClasses:
        """The family's classes with per-layer widths (config, base model, causal LM, head-dim attention)."""
        return pruned_classes(self.modeling, self.prefix, self.class_names)

    def enable_head_dims(self, attn: Submodule) -> HeadDimAttention:
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
        stock_cls = type(config).__mro__[1] if isinstance(config, PrunedConfig) else type(config)
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

    def complete_gguf_config(self, config: Any, metadata: Mapping[str, Any], arch: str) -> None:
        """Set, in place, the config values that transformers' GGUF reader leaves out for this family, from the
        file's header (``metadata``: its keys with scalar and short array values; ``arch``: its architecture)."""

    # --- GGUF export hooks (prunekit.export.gguf) ---------------------------------------------------------------

    def llama_cpp_uniform_refusal(self, model: CausalLM, sizes: list[LayerSizes]) -> str | None:
        """Why a model of uniform widths cannot be written as ``llama_cpp_arch`` (None: it can)."""
        return None

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        """The rotary settings of the full-attention layers (``rope_type``, ``rope_theta``, scaling)."""
        return dict(getattr(config, "rope_parameters", None) or {})

    def gguf_tensor(self, name: str, tensor: torch.Tensor, model: CausalLM) -> torch.Tensor:
        """Parameter ``name`` as llama.cpp's graph for the family reads it: norm weights shifted by ``norm_offset``."""
        if self.norm_offset and tensor.dim() == 1 and name.endswith("norm.weight"):
            return tensor + self.norm_offset
        return tensor

    def gguf_metadata(self, writer: Any, model: CausalLM) -> None:
        """Metadata beyond the shared keys (head counts, widths, rope base, norm epsilon) the family's graph reads."""


# Why families with per-head q/k norms (Qwen3, Gemma-3) refuse ``attn_qk_dim``.
QK_NORM_REFUSAL = (
    "the q/k norm of each head averages the squares of all its head_dim dims, so a head cut to fewer q/k dims "
    "would be normalised by another statistic than the model was trained with; prune attn_vo_dim, query heads or "
    "KV groups instead"
)


def config_head_dim(config: Any) -> int:
    """A config's attention head width: ``head_dim`` where the config has one (Llama, Mistral), else
    hidden_size / heads, as transformers derives it (Qwen2 checkpoints ship no ``head_dim``)."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


ADAPTERS: Registry[ModelAdapter] = Registry("model family")
