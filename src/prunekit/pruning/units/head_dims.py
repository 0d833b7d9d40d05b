"""TransAct's within-head units: q/k dims in rotary pairs and v/o dims, chosen per KV group.

A KV group is one k/v head and the query heads that share it. q·k sums over the q/k dims, so removing a
q/k dim of a group must remove it from the k head and from every query head of the group; RoPE rotates
dims i and i + d/2 together (``rotate_half``), so they go in pairs. The output of query head h is
softmax·V of its group's v head, so a v dim of a group is a v row and the matching o_proj column of each
of its query heads. Unit ``g * n + i`` is dim (or pair) ``i`` of group ``g``; ``groups()`` is the number of
KV groups, so the planner keeps the same number in every group: one q/k width and one v width per layer.

Slicing turns the layer's attention into the family's head-dim subclass
(:class:`prunekit.models.modeling.HeadDimAttention`), which records the widths and each group's kept rotary pairs.
``parent = "attn_kv_group"``: :func:`prunekit.pruning.slicing.apply_plan` applies these units before KV groups
(every group keeps the same number of dims, so the groups keep their numbering), and the planner knows
that a removed KV group takes its dims with it.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import HeadDimAttention
from prunekit.models.types import Submodule
from prunekit.pruning.units.base import UNITS, Member, UnitType


def head_entries(kv: int, per_kv: int, n_rep: int, head_width: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """Entries owned by unit ``g * per_kv + i``: ``h * head_width + i + o`` for the group's heads h, offsets o.

    -> (kv * per_kv, n_rep * len(offsets)) long; head h belongs to group h // n_rep (as in ``repeat_kv``).
    """
    g = torch.arange(kv).view(kv, 1, 1, 1)
    i = torch.arange(per_kv).view(1, per_kv, 1, 1)
    j = torch.arange(n_rep).view(1, 1, n_rep, 1)
    off = torch.tensor(offsets, dtype=torch.long).view(1, 1, 1, -1)
    return ((g * n_rep + j) * head_width + i + off).reshape(kv * per_kv, -1)


def _geometry(adapter: ModelAdapter, attn: Submodule) -> tuple[int, int, int, int]:
    """(k/v heads, query heads per k/v head, q/k head width, v head width), read from the weights."""
    qk, v = adapter.qk_head_dim(attn), adapter.v_head_dim(attn)
    kv = getattr(attn, adapter.k).out_features // qk
    return kv, getattr(attn, adapter.q).out_features // (kv * qk), qk, v


def _kept_per_group(unit: str, attn: Submodule, keep: torch.Tensor, kv: int, per_kv: int) -> int:
    """The number of units every group keeps; PrunekitError unless all groups keep the same number (>= 1)."""
    counts = torch.bincount(keep.long() // per_kv, minlength=kv)
    if (counts != counts[0]).any() or counts[0] == 0:
        raise PrunekitError(
            f"{unit} in layer {attn.layer_idx} keeps {counts.tolist()} units in its {kv} KV groups; a pruned layer "
            f"has one q/k and one v head width, so every group must keep the same number (at least one). "
            f"Plans made by make_plan respect this; a hand-made plan must too."
        )
    return int(counts[0])


class AttnQKDim(UnitType):
    """One rotary pair (q/k dims i and i + d/2) of one KV group: its k head and all its query heads."""

    name = "attn_qk_dim"
    description = "q/k rotary pair of a KV group: dims i and i+d/2 of its k head and all its query heads"
    parent = "attn_kv_group"
    # llama.cpp has one key and one value width for the whole model, equal to the rotary width.
    export_refusal = (
        "llama.cpp has one key and value width, equal to the rotary width, for the whole model and rotates the "
        "first frequencies, not the kept ones; prune heads, KV groups and MLP channels for a llama.cpp export"
    )

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        kv, _, qk, _ = _geometry(adapter, adapter.attention(layer))
        return kv * (qk // 2)

    def groups(self, adapter: ModelAdapter, layer: Submodule) -> int:
        return _geometry(adapter, adapter.attention(layer))[0]

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        attn = adapter.attention(layer)
        kv, n_rep, qk, _ = _geometry(adapter, attn)
        pairs = qk // 2
        a = adapter.attn_path
        tables = {
            adapter.q: head_entries(kv, pairs, n_rep, qk, (0, pairs)),
            adapter.k: head_entries(kv, pairs, 1, qk, (0, pairs)),
        }
        out = []
        for proj, index in tables.items():
            out.append(Member(f"{a}.{proj}.weight", 0, index.shape[1], index))
            if getattr(getattr(attn, proj), "bias", None) is not None:  # Qwen2
                out.append(Member(f"{a}.{proj}.bias", 0, index.shape[1], index))
        return out

    def apply(self, adapter: ModelAdapter, layer: Submodule, keep: torch.Tensor, mode: str) -> None:
        attn = adapter.attention(layer)
        kv, _, qk, _ = _geometry(adapter, attn)
        pairs = qk // 2
        if mode != "slice":
            super().apply(adapter, layer, keep, mode)
            return
        per = _kept_per_group(self.name, attn, keep, kv, pairs)
        if per == pairs and not isinstance(attn, HeadDimAttention):
            return  # nothing removed: the stock attention stays
        head_attn = adapter.enable_head_dims(attn)
        super().apply(adapter, layer, keep, mode)
        head_attn.keep_qk_pairs((keep.long() % pairs).view(kv, per))


class AttnVODim(UnitType):
    """One v dim of one KV group: a v row of its k/v head and that column of o_proj in each of its query heads."""

    name = "attn_vo_dim"
    description = "v/o dim of a KV group: a v_proj row of its k/v head and the o_proj column of each query head"
    parent = "attn_kv_group"
    # llama.cpp has one key and one value width for the whole model, equal to the rotary width.
    export_refusal = (
        "llama.cpp has one key and value width, equal to the rotary width, for the whole model and rotates the "
        "first frequencies, not the kept ones; prune heads, KV groups and MLP channels for a llama.cpp export"
    )

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        kv, _, _, v = _geometry(adapter, adapter.attention(layer))
        return kv * v

    def groups(self, adapter: ModelAdapter, layer: Submodule) -> int:
        return _geometry(adapter, adapter.attention(layer))[0]

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        attn = adapter.attention(layer)
        kv, n_rep, _, v = _geometry(adapter, attn)
        a = adapter.attn_path
        o_index = head_entries(kv, v, n_rep, v, (0,))
        # v rows are contiguous per unit: unit g * v + i is row g * v + i.
        out = [Member(f"{a}.{adapter.v}.weight", 0, 1), Member(f"{a}.{adapter.o}.weight", 1, n_rep, o_index)]
        if getattr(getattr(attn, adapter.v), "bias", None) is not None:  # Qwen2
            out.append(Member(f"{a}.{adapter.v}.bias", 0, 1))
        return out

    def apply(self, adapter: ModelAdapter, layer: Submodule, keep: torch.Tensor, mode: str) -> None:
        attn = adapter.attention(layer)
        kv, _, _, v = _geometry(adapter, attn)
        if mode != "slice":
            super().apply(adapter, layer, keep, mode)
            return
        per = _kept_per_group(self.name, attn, keep, kv, v)
        if per == v and not isinstance(attn, HeadDimAttention):
            return
        head_attn = adapter.enable_head_dims(attn)
        super().apply(adapter, layer, keep, mode)
        head_attn.keep_v_dims(per)


UNITS.register(AttnQKDim.name)(AttnQKDim())
UNITS.register(AttnVODim.name)(AttnVODim())
