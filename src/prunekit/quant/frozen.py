"""How QLoRA's frozen quantized weights are decoded: on every pass (the packed weights alone in memory), or once.

QLoRA trains adapters beside frozen weights; prunekit's own formats (rtn*, llama.cpp blocks) decode a weight on
each forward pass and again when the backward pass recomputes a layer. Where the decoded weights fit in memory
(they do on most machines for the models people QLoRA), decoding them once for the whole training gives the same
numbers at the speed of a float model; ``quantize.lora.decode`` chooses (``auto``: once when the decoded copies take
at most half of the free memory of the device that holds them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "once", "every_pass")
FREE_SHARE = 0.5  # auto: the decoded copies may take this share of the free memory


class HoldsDecoded(nn.Module):
    """A quantized Linear that computes with ``dequantized_weight()``, or with the copy :func:`decoded_once`
    holds while it is frozen."""

    held: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def compute_weight(self) -> torch.Tensor:
        return self.held if self.held is not None else self.dequantized_weight()


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (a GPU's, or the machine's available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _decoded_bytes(module: Any) -> int:
    return int(module.in_features) * int(module.out_features) * torch.finfo(module.compute_dtype).bits // 8


@contextlib.contextmanager
def decoded_once(model: nn.Module, mode: str = "auto") -> Iterator[bool]:
    """Within the block, every :class:`HoldsDecoded` module of ``model`` computes with its weight decoded once
    (``mode`` ``once``; ``auto``: when the copies fit, see the module doc); yields whether they do."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode '{mode}': expected one of {', '.join(DECODE_MODES)}")
    modules: list[Any] = [m for m in model.modules() if isinstance(m, HoldsDecoded)]
    hold = bool(modules) and mode != "every_pass"
    if hold and mode == "auto":
        need = sum(_decoded_bytes(m) for m in modules)
        device = next(iter(modules)).qweight.device
        free = free_bytes(device)
        hold = need <= FREE_SHARE * free
        log.info("QLoRA: the frozen weights' decoded copies take %.0f MiB of %.0f MiB free on %s: decoded %s",
                 need / 2**20, free / 2**20, device, "once" if hold else "on every pass")  # fmt: skip
    try:
        if hold:
            with torch.no_grad():
                for m in modules:
                    m.held = m.dequantized_weight().detach()
        yield hold
    finally:
        for m in modules:
            m.held = None
