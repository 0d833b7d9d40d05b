"""Hidden states over many calibration windows: in memory up to a byte budget, on disk beyond it.

Every pass that holds the hidden states of all calibration windows at once (a layer-major run of a model read one
layer at a time, least-squares reconstruction, the allocation search's reference) keeps them in a
:class:`HiddenStates`, so the number of calibration tokens is bounded by disk, not memory: past the budget
(``model.offload_activations_mib``) each batch is one safetensors file in a temporary folder, removed on close.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MIB = 1 << 20


class HiddenStates:
    """Per-batch hidden states carried between layers: in memory up to a byte budget, then in a temporary
    folder (one safetensors file per batch). Iterating gives batches 0, 1, ... on ``device``."""

    def __init__(self, limit_bytes: int, device: torch.device | str = "cpu") -> None:
        self.limit = limit_bytes
        self.device = torch.device(device)
        self.memory: dict[int, torch.Tensor] = {}
        self.used = 0
        self.count = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.get(i) for i in range(self.count))

    def put(self, i: int, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        t = t.detach().to("cpu").contiguous()
        self.count = max(self.count, i + 1)
        old = self.memory.pop(i, None)
        self.used -= old.numel() * old.element_size() if old is not None else 0
        size = t.numel() * t.element_size()
        if self.used + size <= self.limit:
            self.memory[i] = t
            self.used += size
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="prunekit-hidden-")
            log.info("hidden states beyond %d MiB go to %s", self.limit // MIB, self._dir.name)
        save_file({"h": t}, str(Path(self._dir.name) / f"{i}.safetensors"))

    def get(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if i in self.memory:
            return self.memory[i].to(self.device)
        if self._dir is None:
            raise KeyError(i)
        return load_file(str(Path(self._dir.name) / f"{i}.safetensors"), device=str(self.device))["h"]

    def close(self) -> None:
        self.memory.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
