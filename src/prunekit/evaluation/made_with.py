"""Which params an evaluated model was made with, as a short digest its evaluation records.

An experiment that reruns only some stages (``dvc exp run evaluate@pruned``, a sweep stopped early) still carries
the other stages' metrics files, produced by earlier params. Each evaluation records the digest of the params its
model depends on (:data:`UPSTREAM`: every section of the stages from the download to that model, and the
evaluation's own); the experiment report recomputes it from each experiment's params and marks a metric whose
digest differs as not produced by that experiment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

_DENSE = ("seed", "runtime", "model", "data", "evaluate")
_PRUNED = (*_DENSE, "calibrate", "score", "prune", "schedule")
_RECOVERED = (*_PRUNED, "recover")
# The params sections each evaluated model depends on, by its place in the pipeline (its metrics file's name).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "dense": _DENSE,
    "pruned": _PRUNED,
    "recovered": _RECOVERED,
    "quantized": (*_RECOVERED, "search", "quantize"),
}


def made_with(params: Mapping[str, Any], model: str) -> str:
    """12 hex digits of the params (a validated params mapping, ``Params.model_dump(mode="json")``) that ``model``
    ("dense", "pruned", "recovered", "quantized") depends on."""
    if model not in UPSTREAM:
        raise ValueError(f"unknown model '{model}'; one of {', '.join(UPSTREAM)}")
    subset = {section: params[section] for section in UPSTREAM[model]}
    return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:12]
