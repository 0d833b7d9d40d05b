"""Allocations, registered by name (``prune.allocation``): how many units each layer keeps.

Each module registers its allocation when imported; add a module here to add one.
"""

from __future__ import annotations

from prunekit.pruning.allocations import search, threshold, uniform  # noqa: F401  (registration)
from prunekit.pruning.allocations.base import ALLOCATIONS, Allocation, Counts, make_plan

__all__ = ["ALLOCATIONS", "Allocation", "Counts", "make_plan"]
