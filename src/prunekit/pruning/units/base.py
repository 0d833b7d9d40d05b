"""Structured units: the coupled slices of weights that are removed together.

A unit type says, for one decoder layer, how many units there are and which weight slices belong to
each: a list of :class:`Member` (a parameter, the axis the units are laid along, and how many entries
of that axis each unit owns). Scoring, masking and slicing are all written once over members, so a
new unit type only has to describe its members.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.registry import Registry


@dataclass(frozen=True)
class Member:
    """Unit ``u`` owns ``[u * width, (u + 1) * width)`` along ``dim`` of parameter ``path``.

    ``path`` is relative to the decoder layer, e.g. ``"self_attn.q_proj.weight"``. Units whose entries are
    not contiguous (a rotary pair is dims i and i + d/2 of every query head of a KV group) list them in
    ``index``: a (units, width) long tensor whose row ``u`` holds the ``width`` entries unit ``u`` owns.
    """

    path: str
    dim: int
    width: int
    index: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.index is not None and (self.index.dim() != 2 or self.index.shape[1] != self.width):
            raise ValueError(f"Member {self.path}: index must be (units, {self.width}), got {tuple(self.index.shape)}")

    def entries(self, units: torch.Tensor) -> torch.Tensor:
        """The axis entries owned by ``units``, ascending: slicing keeps the surviving entries' order."""
        if self.index is None:
            return unit_indices(units, self.width)
        return self.index[units.long()].reshape(-1).sort().values

    def per_unit(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """``values`` (shaped like the parameter) regrouped to (n, everything unit u owns)."""
        moved = values.movedim(self.dim, 0)
        if self.index is None:
            return moved.reshape(n, -1)
        return moved[self.index.to(moved.device)].reshape(n, -1)


class UnitType(ABC):
    """A kind of unit: subclasses say how many units a layer has and which slices each owns."""

    name = ""
    description = ""
    # Each group of this type's units (see ``groups``) lies inside one unit of ``parent`` (query heads
    # inside KV groups): the planner then counts only the removals in the parent units that stay.
    parent = ""
    # A unit that is the whole decoder layer (depth pruning): planned globally, kept 0 or 1 times per layer.
    whole_layer = False
    # A unit that spans the whole model (a hidden channel): one layout, at the first pruned layer's index,
    # stands for the model; its members reach outside that layer (``ModelAdapter.layers`` links a layer
    # to its model). See units/hidden.py.
    model_wide = False
    # The projection whose input columns a unit owns as one contiguous block of its members ("o_proj" or
    # "down_proj", see CONSUMERS): activation criteria read a unit through the channel statistics of those
    # columns, and FLAP's compensation folds their means into that projection's bias. "": neither applies.
    input_of = ""
    # Why llama.cpp cannot run a model this type pruned ("": it can): the validate stage refuses the unit type
    # with the pipeline's GGUF export before any work.
    export_refusal = ""

    def input_width(self, adapter: ModelAdapter, layer: Submodule) -> int:
        """Input columns of ``input_of`` one unit owns: unit u owns ``[u * width, (u + 1) * width)``."""
        path = consumer_path(adapter, self.input_of)
        for m in self.members(adapter, layer):
            if m.path == path and m.dim == 1 and m.index is None:
                return m.width
        raise RuntimeError(f"unit type '{self.name}' declares input_of={self.input_of!r} but owns no block of {path}")

    def score_layers(self, layers: list[int]) -> list[int]:
        """Layer indices at which to score this type: each requested layer, or only index 0 for a
        model-wide type (its units and scores are the same whichever layer names them)."""
        return [0] if self.model_wide else list(layers)

    @property
    def order(self) -> int:
        """Application order in ``apply_plan`` (ascending): a plan's indices all number the dense model's
        units, so units inside a parent go first (the parent's numbering survives them), whole layers last
        (width indices are per layer index)."""
        if self.whole_layer:
            return 2
        return 0 if self.parent else 1

    @abstractmethod
    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        """Number of units of this type in ``layer``."""

    @abstractmethod
    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        """The weight slices each unit owns in ``layer``."""

    def groups(self, adapter: ModelAdapter, layer: Submodule) -> int:
        """Units form this many equal groups that must keep equal counts (1: no constraint)."""
        return 1

    def refusal(self, adapter: ModelAdapter, model: CausalLM) -> str | None:
        """Why this unit type cannot prune ``model`` (read from its shapes), or None. Default: it always can."""
        return None

    def params_per_unit(self, adapter: ModelAdapter, layer: Submodule) -> int:
        """Parameters one unit holds in this layer (all members, biases included)."""
        total = 0
        for m in self.members(adapter, layer):
            p = layer.get_parameter(m.path)
            total += m.width * (p.numel() // p.shape[m.dim])
        return total

    def reduce(self, adapter: ModelAdapter, layer: Submodule, elementwise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum a per-element quantity (keyed by member path) over each unit's slices -> (count,)."""
        n = self.count(adapter, layer)
        out = torch.zeros(n, dtype=torch.float64)
        for m in self.members(adapter, layer):
            out += m.per_unit(elementwise[m.path], n).sum(dim=1).to(torch.float64).cpu()
        return out

    def apply(self, adapter: ModelAdapter, layer: Submodule, keep: torch.Tensor, mode: str) -> None:
        """Keep only units ``keep`` (sorted indices): ``mode="slice"`` shrinks, ``"mask"`` zeroes the rest."""
        for m in self.members(adapter, layer):
            owner, attr = _owner(layer, m.path)
            p = getattr(owner, attr)
            rows = m.entries(keep).to(p.device)
            if mode == "slice":
                new = p.data.index_select(m.dim, rows).clone()
                setattr(owner, attr, nn.Parameter(new, requires_grad=p.requires_grad))
                _fix_features(owner)
            else:
                drop = torch.ones(p.shape[m.dim], dtype=torch.bool, device=p.device)
                drop[rows] = False
                p.data.index_fill_(m.dim, drop.nonzero().squeeze(1), 0.0)

    def apply_model(self, model: CausalLM, adapter: ModelAdapter, keep: dict[int, list[int]], mode: str) -> None:
        """Apply ``keep`` (layer index -> kept unit indices) to the model; unit types that change the
        layer list (``whole_layer``) override this."""
        layers = adapter.layers(model)
        for idx, kept in keep.items():
            self.apply(adapter, layers[idx], torch.tensor(sorted(kept), dtype=torch.long), mode)
            if mode == "slice":
                adapter.refresh_layer(layers[idx])


# The projections whose inputs a unit can own (``UnitType.input_of``): the attention output and the MLP output.
O_PROJ, DOWN_PROJ = "o_proj", "down_proj"
CONSUMERS = (O_PROJ, DOWN_PROJ)


def consumer_path(adapter: ModelAdapter, role: str) -> str:
    """The weight of the ``o_proj`` or ``down_proj`` projection, relative to a decoder layer."""
    if role == O_PROJ:
        return f"{adapter.attn_path}.{adapter.o}.weight"
    if role == DOWN_PROJ:
        return f"{adapter.mlp_path}.{adapter.down}.weight"
    raise ValueError(f"unknown projection role {role!r}; expected one of {CONSUMERS}")


def unit_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Expand unit indices to the axis entries they own: [1, 3], width 2 -> [2, 3, 6, 7]."""
    return (keep.long().unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def _owner(layer: Submodule, path: str) -> tuple[nn.Module, str]:
    module_path, _, attr = path.rpartition(".")
    return layer.get_submodule(module_path), attr


def _fix_features(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


UNITS: Registry[UnitType] = Registry("unit type")
