"""Pruned model classes: stock transformers families whose decoder layers may differ in width.

A pruned checkpoint whose layers all keep the same widths is saved with the stock config of its family,
so stock transformers loads it without prunekit. When layers differ, the config is a subclass of the
family's config with ``layer_sizes`` (one dict per decoder layer) and ``model_type = "prunekit_<family>"``;
``import prunekit`` registers these with the Auto classes, so ``AutoModelForCausalLM.from_pretrained``
loads them. The model classes subclass the family's own modules (no vendored modeling code): each
decoder layer is built from a copy of the config carrying that layer's sizes. Layers whose head dims are
pruned (q/k and v widths of their own, which no stock config can express) get the family's attention
subclass (``ModelAdapter.head_dim_attention``); the others keep the stock attention. Each family's classes live
in its module of :mod:`prunekit.models.families`.

A pruned config with ``output_bias: true`` gives every layer's o_proj and down_proj a bias: FLAP's bias
compensation on a family whose stock config has no switch for them (Mistral, Qwen2; Llama has ``attention_bias``
and ``mlp_bias``). Such a checkpoint always has a prunekit config, uniform widths or not.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# Within-head widths of a layer whose head dims are pruned (all three or none; none: stock attention).
# ``rope_pairs`` lists, per k/v head, the kept rotary pairs (frequency indices in [0, head_dim / 2)).
HEAD_DIM_KEYS = ("qk_head_dim", "v_head_dim", "rope_pairs")
# Keys of one entry of ``layer_sizes``: the per-layer config attributes that pruning changes.
LAYER_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", *HEAD_DIM_KEYS)
# A pruned config's switch for o_proj / down_proj biases the family's stock config cannot express.
OUTPUT_BIAS = "output_bias"


def add_bias(linear: nn.Linear) -> bool:
    """Give ``linear`` a zero bias (its weight's dtype and device) if it has none; whether it added one."""
    if linear.bias is not None:
        return False
    w = linear.weight
    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)
    return True


def layer_config(config: Any, layer_idx: int) -> Any:
    """A shallow copy of ``config`` with the sizes of decoder layer ``layer_idx``."""
    sizes = config.layer_sizes[layer_idx] if config.layer_sizes else {}
    cfg = copy.copy(config)
    for key, value in sizes.items():
        object.__setattr__(cfg, key, value)
    return cfg


def check_layer_sizes(config: Any) -> None:
    """Raise ValueError unless ``layer_sizes`` has one valid entry per decoder layer."""
    sizes = config.layer_sizes
    if sizes is None:
        return
    if len(sizes) != config.num_hidden_layers:
        raise ValueError(f"layer_sizes has {len(sizes)} entries for {config.num_hidden_layers} layers")
    for i, entry in enumerate(sizes):
        unknown = set(entry) - set(LAYER_SIZE_KEYS)
        if unknown:
            raise ValueError(f"layer_sizes[{i}] has unknown keys {sorted(unknown)}; valid: {LAYER_SIZE_KEYS}")
        heads = entry.get("num_attention_heads", config.num_attention_heads)
        kv = entry.get("num_key_value_heads", config.num_key_value_heads)
        if kv < 1 or heads < 1 or heads % kv:
            raise ValueError(f"layer_sizes[{i}]: {heads} query heads cannot share {kv} key/value heads")
        if entry.get("intermediate_size", config.intermediate_size) < 1:
            raise ValueError(f"layer_sizes[{i}]: intermediate_size must be positive")
        _check_head_dims(i, entry, getattr(config, "head_dim", None) or config.hidden_size // heads, kv)


def _check_head_dims(i: int, entry: dict[str, Any], head_dim: int, kv: int) -> None:
    """Raise ValueError unless the within-head widths of ``layer_sizes[i]`` are absent or consistent."""
    present = [k for k in HEAD_DIM_KEYS if k in entry]
    if not present:
        return
    if len(present) != len(HEAD_DIM_KEYS):
        raise ValueError(f"layer_sizes[{i}] has {present}: give all of {HEAD_DIM_KEYS} or none")
    qk, v, pairs = (entry[k] for k in HEAD_DIM_KEYS)
    if qk < 2 or qk % 2 or qk > head_dim:
        raise ValueError(f"layer_sizes[{i}]: qk_head_dim={qk} must be even (rotary pairs) and in [2, {head_dim}]")
    if not 1 <= v <= head_dim:
        raise ValueError(f"layer_sizes[{i}]: v_head_dim={v} must be in [1, {head_dim}]")
    if len(pairs) != kv or any(len(p) != qk // 2 for p in pairs):
        raise ValueError(f"layer_sizes[{i}]: rope_pairs must list {qk // 2} pairs for each of {kv} key/value heads")
    for p in pairs:
        if list(p) != sorted(set(p)) or p[0] < 0 or p[-1] >= head_dim // 2:
            raise ValueError(
                f"layer_sizes[{i}]: rope_pairs {list(p)} must be ascending, distinct, in [0, {head_dim // 2})"
            )


def build_layer(
    layer_cls: type[nn.Module], config: Any, idx: int, attention_cls: type[nn.Module], outputs: tuple[str, ...] = ()
) -> nn.Module:
    """Decoder layer ``idx`` with its sizes; ``attention_cls`` replaces the attention if its head dims are pruned,
    and the ``outputs`` projections (paths in the layer) get biases when the config's ``output_bias`` says so."""
    cfg = layer_config(config, idx)
    layer = layer_cls(cfg, idx)
    if getattr(cfg, "qk_head_dim", None) is not None:
        layer.self_attn = attention_cls(cfg, idx)
    if getattr(cfg, OUTPUT_BIAS, False):
        for path in outputs:
            add_bias(layer.get_submodule(path))
    return layer


def build_layers(
    layer_cls: type[nn.Module], config: Any, attention_cls: type[nn.Module], outputs: tuple[str, ...] = ()
) -> nn.ModuleList:
    """Decoder layers with per-layer sizes, all sharing ``config`` afterwards.

    Modules keep a reference to the config they were built with and read run-time settings from it
    (``_attn_implementation``); pointing them back at the shared config keeps those settings global.
    """
    n = config.num_hidden_layers
    layers = nn.ModuleList(build_layer(layer_cls, config, i, attention_cls, outputs) for i in range(n))
    for layer in layers:
        for module in layer.modules():
            if getattr(module, "config", None) is not None and module is not layer:
                module.config = config
    return layers


class PerLayerModel:
    """Mixin for a family's base model: rebuild the decoder layers with per-layer sizes."""

    decoder_layer_cls: type[nn.Module]
    attention_cls: type[nn.Module]  # for layers whose head dims are pruned

    def __init__(self, config: Any) -> None:
        from prunekit.models.adapters import adapter_for

        super().__init__(config)  # type: ignore[call-arg]
        a = adapter_for(config)
        outputs = (f"{a.attn_path}.{a.o}", f"{a.mlp_path}.{a.down}")
        self.layers = build_layers(self.decoder_layer_cls, config, self.attention_cls, outputs)
        self.post_init()  # type: ignore[attr-defined]


class PerLayerCausalLM:
    """Mixin for a family's causal LM: use the per-layer base model."""

    base_model_cls: type[nn.Module]

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.model = self.base_model_cls(config)
        self.post_init()  # type: ignore[attr-defined]


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` load pruned configs (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from prunekit.models.adapters import ADAPTERS

    for config_cls, model_cls, causal_cls in (adapter.pruned for _, adapter in ADAPTERS.items()):
        if config_cls.model_type in CONFIG_MAPPING:
            continue
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModel.register(config_cls, model_cls)
        AutoModelForCausalLM.register(config_cls, causal_cls)
