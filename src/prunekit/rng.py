"""Seeded randomness that leaves the caller's random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generators (CPU and every CUDA device) seeded with ``seed`` inside the block, and restored
    when it ends: a library call that draws random numbers (LoRA init, dropout) is reproducible from its own
    seed and changes nothing its caller did not ask for."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
