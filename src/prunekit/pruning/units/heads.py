"""Query-head pruning inside KV groups: fewer query heads, the same k/v heads (and KV cache).

With grouped-query attention, query head ``h`` reads k/v head ``h // n_rep`` (``repeat_kv``), so the query
heads form ``num_key_value_heads`` contiguous groups. A pruned layer still needs the same number of query
heads per k/v head, hence ``groups()`` = number of k/v heads: the planner keeps the same count in every
group, and :func:`prunekit.pruning.slicing.apply_plan` refuses a plan that does not.

With ``attn_kv_group`` in the same plan, both unit types number the dense layer's units: query heads are
applied first (every KV group loses the same heads, so the groups stay whole and in order), then KV
groups; ``parent`` tells the planner that a removed KV group already takes its query heads with it.
"""

from __future__ import annotations

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import Submodule
from prunekit.pruning.units.base import UNITS, Member, UnitType


class AttnQueryHead(UnitType):
    """One query head: its q_proj rows (and q bias rows), and its o_proj columns."""

    name = "attn_query_head"
    description = "attention query head: its q_proj rows and o_proj columns; every KV group keeps the same count"
    parent = "attn_kv_group"
    input_of = "o_proj"

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        attn = adapter.attention(layer)
        return getattr(attn, adapter.q).out_features // adapter.qk_head_dim(attn)

    def groups(self, adapter: ModelAdapter, layer: Submodule) -> int:
        attn = adapter.attention(layer)
        return getattr(attn, adapter.k).out_features // adapter.qk_head_dim(attn)

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        attn = adapter.attention(layer)
        # q/k and v/o head widths differ once head dims are pruned (units/head_dims.py).
        qk, v = adapter.qk_head_dim(attn), adapter.v_head_dim(attn)
        a = adapter.attn_path
        out = [Member(f"{a}.{adapter.q}.weight", 0, qk), Member(f"{a}.{adapter.o}.weight", 1, v)]
        if getattr(getattr(attn, adapter.q), "bias", None) is not None:  # Qwen2
            out.append(Member(f"{a}.{adapter.q}.bias", 0, qk))
        return out


UNITS.register(AttnQueryHead.name)(AttnQueryHead())
