"""Importance criteria, registered by name (``score.criterion`` in params.yaml)."""

from __future__ import annotations

from prunekit.pruning.criteria import bip, block_influence, flap, lora, magnitude, taylor, transact  # noqa: F401  (registration)
from prunekit.pruning.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores

__all__ = ["CRITERIA", "Criterion", "ScoreRequest", "Scores"]
