"""The dense-width units of LLM-Pruner: attention KV groups and MLP channels."""

from __future__ import annotations

import torch

from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import HeadDimAttention
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.units.base import UNITS, Member, UnitType


class AttnKVGroup(UnitType):
    """One key/value head with the query heads that share it (GQA-safe attention head pruning)."""

    name = "attn_kv_group"
    description = "attention KV group: one k/v head, its query heads, and their o_proj columns"
    input_of = "o_proj"

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        attn = adapter.attention(layer)
        return getattr(attn, adapter.k).out_features // adapter.qk_head_dim(attn)

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        attn = adapter.attention(layer)
        # q/k and v/o head widths differ once head dims are pruned (units/head_dims.py).
        qk, v = adapter.qk_head_dim(attn), adapter.v_head_dim(attn)
        n_rep = getattr(attn, adapter.q).out_features // getattr(attn, adapter.k).out_features
        a = adapter.attn_path
        out = [
            Member(f"{a}.{adapter.q}.weight", 0, n_rep * qk),
            Member(f"{a}.{adapter.k}.weight", 0, qk),
            Member(f"{a}.{adapter.v}.weight", 0, v),
            Member(f"{a}.{adapter.o}.weight", 1, n_rep * v),
        ]
        # Families with q/k/v biases (Qwen2) slice them with their rows.
        for proj, width in ((adapter.q, n_rep * qk), (adapter.k, qk), (adapter.v, v)):
            if getattr(getattr(attn, proj), "bias", None) is not None:
                out.append(Member(f"{a}.{proj}.bias", 0, width))
        return out

    def refusal(self, adapter: ModelAdapter, model: CausalLM) -> str | None:
        if all(self.count(adapter, layer) <= 1 for layer in adapter.layers(model)):
            return (
                "every layer of this model has one key/value head, so a KV group is the layer's whole attention "
                "(Gemma-3 270M / 1B); prune attn_query_head (the heads sharing it) and mlp_channel instead"
            )
        return None

    def apply(self, adapter: ModelAdapter, layer: Submodule, keep: torch.Tensor, mode: str) -> None:
        super().apply(adapter, layer, keep, mode)
        attn = adapter.attention(layer)
        if mode == "slice" and isinstance(attn, HeadDimAttention):
            attn.keep_kv_heads(keep)  # the kept k/v heads' rotary pairs


class MLPChannel(UnitType):
    """One intermediate channel: a row of gate_proj and up_proj and the matching column of down_proj."""

    name = "mlp_channel"
    description = "MLP channel: a row of gate_proj and up_proj and a column of down_proj"
    input_of = "down_proj"

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        return getattr(adapter.mlp(layer), adapter.gate).out_features

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        mlp = adapter.mlp(layer)
        m = adapter.mlp_path
        out = [
            Member(f"{m}.{adapter.gate}.weight", 0, 1),
            Member(f"{m}.{adapter.up}.weight", 0, 1),
            Member(f"{m}.{adapter.down}.weight", 1, 1),
        ]
        for proj in (adapter.gate, adapter.up):
            if getattr(getattr(mlp, proj), "bias", None) is not None:
                out.append(Member(f"{m}.{proj}.bias", 0, 1))
        return out


UNITS.register(AttnKVGroup.name)(AttnKVGroup())
UNITS.register(MLPChannel.name)(MLPChannel())
