"""Held-out windows: a share of the calibration windows that judges what the other windows chose.

A choice fitted to a few hundred tokens (a least-squares refit, an allocation searched on its objective) looks best
on those tokens whatever it does elsewhere. The held-out windows are spread evenly over the run of windows
(``share`` 0.25: windows 3, 7, 11, ...), so a text's beginning and end are on both sides, and the split depends on
nothing but the window's index: the same windows are held out on every run and machine.

A challenger replaces what it is compared with only if it wins there by more than chance (:func:`beats`): its mean
per-window gain must exceed a number of standard errors of that mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def held_out(window: int, share: float) -> bool:
    """Whether window ``window`` (0-based) is held out: ``share`` of every run of windows, spread evenly."""
    return math.floor((window + 1) * share) > math.floor(window * share)


def held_out_mask(windows: int, share: float) -> torch.Tensor:
    """``held_out`` of windows ``0 .. windows - 1`` as a boolean tensor."""
    return torch.tensor([held_out(w, share) for w in range(windows)], dtype=torch.bool)


def too_few(windows: int, share: float, more: str, off: str) -> str | None:
    """Why ``windows`` windows cannot be split at ``share`` (None: they can): ``more`` names the params that give
    more windows, ``off`` the setting that holds none out."""
    if share > 0 and math.floor(windows * share) == 0:
        return f"{share} holds out none of the {windows} windows; give more windows ({more}) or set {off}"
    return None


def held_out_gain(baseline: list[float], challenger: list[float]) -> tuple[float, float]:
    """The challenger's mean advantage over the baseline on the held-out windows (per-window objectives, lower is
    better) and the standard error of that mean (0 with one window: nothing to estimate it from)."""
    diff = np.asarray(baseline, dtype=np.float64) - np.asarray(challenger, dtype=np.float64)
    error = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
    return float(diff.mean()), error


def beats(gain: float, error: float, standard_errors: float) -> bool:
    """Whether a mean gain of ``gain`` with standard error ``error`` clears ``standard_errors`` of them (with no
    spread to measure, any gain does)."""
    return gain > standard_errors * error
