"""Structured units: the coupled slices of weights that are removed together.

A unit type says, for one decoder layer, how many units there are and which weight slices belong to
each: a list of :class:`Member` (a parameter, the axis the units are laid along, and how many entries
of that axis each unit owns). Scoring, masking and slicing are all written once over members, so a
new unit type only has to describe its members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.registry import Registry


@dataclass(frozen=True)
class Member:
    """Unit ``u`` owns ``[u * width, (u + 1) * width)`` along ``dim`` of parameter ``path``.

    ``path`` is relative to the decoder layer, e.g. ``"self_attn.q_proj.weight"``.
    """

    path: str
    dim: int
    width: int


class UnitType(ABC):
    """A kind of unit: subclasses say how many units a layer has and which slices each owns."""

    name = ""
    description = ""

    @abstractmethod
    def count(self, adapter: ModelAdapter, layer: nn.Module) -> int:
        """Number of units of this type in ``layer``."""

    @abstractmethod
    def members(self, adapter: ModelAdapter, layer: nn.Module) -> list[Member]:
        """The weight slices each unit owns in ``layer``."""

    def groups(self, adapter: ModelAdapter, layer: nn.Module) -> int:
        """Units form this many equal groups that must keep equal counts (1: no constraint)."""
        return 1

    def params_per_unit(self, adapter: ModelAdapter, layer: nn.Module) -> int:
        """Parameters one unit holds in this layer (all members, biases included)."""
        total = 0
        for m in self.members(adapter, layer):
            p = layer.get_parameter(m.path)
            total += m.width * (p.numel() // p.shape[m.dim])
        return total

    def reduce(self, adapter: ModelAdapter, layer: nn.Module, elementwise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum a per-element quantity (keyed by member path) over each unit's slices -> (count,)."""
        n = self.count(adapter, layer)
        out = torch.zeros(n, dtype=torch.float64)
        for m in self.members(adapter, layer):
            e = elementwise[m.path]
            out += e.movedim(m.dim, 0).reshape(n, -1).sum(dim=1).to(torch.float64).cpu()
        return out

    def apply(self, adapter: ModelAdapter, layer: nn.Module, keep: torch.Tensor, mode: str) -> None:
        """Keep only units ``keep`` (sorted indices): ``mode="slice"`` shrinks, ``"mask"`` zeroes the rest."""
        n = self.count(adapter, layer)
        for m in self.members(adapter, layer):
            owner, attr = _owner(layer, m.path)
            p = getattr(owner, attr)
            rows = unit_indices(keep, m.width).to(p.device)
            if mode == "slice":
                new = p.data.index_select(m.dim, rows).clone()
                setattr(owner, attr, nn.Parameter(new, requires_grad=p.requires_grad))
                _fix_features(owner)
            else:
                drop = torch.ones(n * m.width, dtype=torch.bool, device=p.device)
                drop[rows] = False
                p.data.index_fill_(m.dim, drop.nonzero().squeeze(1), 0.0)


def unit_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Expand unit indices to the axis entries they own: [1, 3], width 2 -> [2, 3, 6, 7]."""
    return (keep.long().unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def _owner(layer: nn.Module, path: str) -> tuple[nn.Module, str]:
    module_path, _, attr = path.rpartition(".")
    return layer.get_submodule(module_path), attr


def _fix_features(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


UNITS: Registry[UnitType] = Registry("unit type")


class AttnKVGroup(UnitType):
    """One key/value head with the query heads that share it (GQA-safe attention head pruning)."""

    name = "attn_kv_group"
    description = "attention KV group: one k/v head, its query heads, and their o_proj columns"

    def count(self, adapter: ModelAdapter, layer: nn.Module) -> int:
        attn = adapter.attention(layer)
        return getattr(attn, adapter.k).out_features // attn.head_dim

    def members(self, adapter: ModelAdapter, layer: nn.Module) -> list[Member]:
        attn = adapter.attention(layer)
        hd = int(attn.head_dim)
        q_width = hd * getattr(attn, adapter.q).out_features // getattr(attn, adapter.k).out_features
        a = adapter.attn_path
        out = [
            Member(f"{a}.{adapter.q}.weight", 0, q_width),
            Member(f"{a}.{adapter.k}.weight", 0, hd),
            Member(f"{a}.{adapter.v}.weight", 0, hd),
            Member(f"{a}.{adapter.o}.weight", 1, q_width),
        ]
        # Families with q/k/v biases (Qwen2) slice them with their rows.
        for proj, width in ((adapter.q, q_width), (adapter.k, hd), (adapter.v, hd)):
            if getattr(getattr(attn, proj), "bias", None) is not None:
                out.append(Member(f"{a}.{proj}.bias", 0, width))
        return out


class MLPChannel(UnitType):
    """One intermediate channel: a row of gate_proj and up_proj and the matching column of down_proj."""

    name = "mlp_channel"
    description = "MLP channel: a row of gate_proj and up_proj and a column of down_proj"

    def count(self, adapter: ModelAdapter, layer: nn.Module) -> int:
        return getattr(adapter.mlp(layer), adapter.gate).out_features

    def members(self, adapter: ModelAdapter, layer: nn.Module) -> list[Member]:
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
