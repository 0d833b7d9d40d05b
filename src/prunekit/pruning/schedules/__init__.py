"""Pruning schedules, registered by name (``prune.schedule`` in params.yaml): how a model gets from its scores
to the target.

``oneshot``
    One plan from the score stage's scores, one cut; recovery comes afterwards.
``iterative`` (LoRAPrune)
    Masks raised on a cubic schedule while LoRA trains, importance from the training adapters.
``kshot`` (TransAct)
    ``schedule.shots`` rounds of score -> cut -> LoRA steps.

A schedule is one module with a :class:`Schedule` subclass and its ``SCHEDULES.register(name)(instance)`` line,
imported below. Long schedules checkpoint into the stage's state folder (DVC ``persist``) and resume from it.
"""

from __future__ import annotations

from prunekit.pruning.schedules import iterative, kshot, oneshot  # noqa: F401  (registration)
from prunekit.pruning.schedules.base import SCHEDULES, Cut, PruneJob, PruneResult, Schedule, prune_model, split_scores
from prunekit.pruning.schedules.iterative import IterativeSettings, UnitMasks, cubic_fraction, iterative_prune
from prunekit.pruning.schedules.kshot import KeptUnits, KShotSettings, kshot_prune, kshot_targets
from prunekit.pruning.schedules.state import digest, fingerprint

__all__ = [
    "SCHEDULES",
    "Cut",
    "IterativeSettings",
    "KShotSettings",
    "KeptUnits",
    "PruneJob",
    "PruneResult",
    "Schedule",
    "UnitMasks",
    "cubic_fraction",
    "digest",
    "fingerprint",
    "iterative_prune",
    "kshot_prune",
    "kshot_targets",
    "prune_model",
    "split_scores",
]
