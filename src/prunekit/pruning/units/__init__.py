"""Structured unit types, registered by name (``prune.units`` in params.yaml).

Each module registers its unit types when imported; add a module here to add unit types.
"""

from __future__ import annotations

from prunekit.pruning.units import head_dims, heads, hidden, layers, width  # noqa: F401  (registration)
from prunekit.pruning.units.base import UNITS, Member, UnitType, unit_indices

__all__ = ["UNITS", "Member", "UnitType", "unit_indices"]
