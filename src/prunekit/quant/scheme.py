"""A quantization scheme as data: its name, nominal bits, the backend that realises it, and the ``quantize``
settings every scheme reads (:mod:`prunekit.quant.schemes` registers the schemes; :mod:`prunekit.quant.backend`
realises them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size on every device it supports
BNB_NESTED_BLOCKSIZE = 256  # blocks per second-level absmax with double quantization


@dataclass(frozen=True)
class QuantSettings:
    """The ``quantize`` settings every scheme reads."""

    group_size: int = 128
    double_quant: bool = True
    int8_threshold: float = 6.0

    @classmethod
    def from_params(cls, section: Any) -> QuantSettings:
        """From the ``quantize`` section of the params (anything with these three attributes)."""
        return cls(section.group_size, section.double_quant, section.int8_threshold)


@dataclass(frozen=True)
class Scheme:
    """One quantization format: a config object. ``bits`` is the nominal width of a weight (the search budget
    counts it); ``backend`` names the :class:`~prunekit.quant.backend.QuantBackend` that realises it and
    ``variant`` what that backend needs besides the bits (a 4-bit code book, a 16-bit dtype)."""

    name: str
    bits: int
    backend: str
    description: str
    variant: str = ""
