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
