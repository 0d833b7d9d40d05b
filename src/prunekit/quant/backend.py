"""How a quantization scheme is realised: one backend per storage format, registered by name.

A :class:`~prunekit.quant.schemes.Scheme` is a small config object (name, nominal bits, backend name, variant);
its backend does the four things the pipeline needs of a format: count its storage, give a weight's
quantize -> dequantize image (the search), build the quantized module from a Linear (the quantize stage), and
rebuild it from saved tensors (loading). A new format is one module with a :class:`QuantBackend` subclass and
its registration line, imported by the package (``prunekit/quant/__init__.py``), plus its schemes' registration
lines (:mod:`prunekit.quant.schemes`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from prunekit.quant.scheme import QuantSettings, Scheme
from prunekit.registry import Registry


class QuantBackend(ABC):
    """A storage format: what a weight costs, its image, and the module that holds it."""

    name = ""
    # Whether its modules give back their weight (``dequantized_weight()``), so that a token embedding can be held
    # as one (prunekit.quant.embedding.QuantizedEmbedding); bitsandbytes' modules only multiply.
    holds_embeddings = False

    @abstractmethod
    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        """Bits a (rows x cols) weight takes, codes and their statistics together."""

    def check_available(self, scheme: Scheme) -> None:  # noqa: B027  (optional)
        """Raise a PrunekitError saying what to install if this format's encoder is missing (present by default)."""

    def check_shape(self, scheme: Scheme, rows: int, cols: int, what: str) -> None:  # noqa: B027  (optional)
        """Raise a PrunekitError naming ``what`` if this format cannot hold a (rows x cols) weight (any by default)."""

    @abstractmethod
    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        """``w`` after quantize -> dequantize (same dtype and device as ``w``)."""

    @abstractmethod
    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        """The quantized module holding ``linear``'s weight and bias, on ``linear``'s device."""

    @abstractmethod
    def holds(self, module: nn.Module) -> bool:
        """Whether ``module`` is one this backend realised (it counts as a Linear of in x out weights)."""

    def dequantize(self, module: Any) -> torch.Tensor:
        """The (out x in) weight ``module`` computes with, in float32 (what its codes and statistics encode);
        ``module``: one this backend realised (its attributes are the backend's own)."""
        return module.dequantized_weight().float()

    def gguf_type(self, scheme: Scheme) -> str | None:
        """The llama.cpp tensor type that stores this scheme's weights as they are (None: GGUF has none)."""
        return None

    def lora_layers(self) -> dict[type, type]:
        """peft's LoRA layer for each module type this backend realises that peft does not know."""
        return {}

    @abstractmethod
    def load(
        self,
        linear: nn.Linear,
        scheme: Scheme,
        settings: QuantSettings,
        state: dict[str, torch.Tensor],
        device: str,
    ) -> nn.Module:
        """The quantized module of ``linear``'s shape filled from its saved ``state`` (a PrunekitError if unfit)."""


BACKENDS: Registry[QuantBackend] = Registry("quantization backend")


def backend_for(scheme: Scheme) -> QuantBackend:
    """The backend that realises ``scheme`` (registered by the ``prunekit.quant`` package)."""
    return BACKENDS.get(scheme.backend)


def storage_bits(scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
    """Bits a (rows x cols) weight takes in ``scheme``, codes and their scales together."""
    return backend_for(scheme).storage_bits(scheme, rows, cols, settings)


def load_state(module: nn.Module, scheme: Scheme, state: dict[str, torch.Tensor], device: str) -> nn.Module:
    """``module`` moved to ``device`` and filled from a saved ``state`` (a PrunekitError if it does not fit)."""
    from prunekit.errors import PrunekitError

    module = module.to(device)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise PrunekitError(f"saved state of a {scheme.name} module does not fit it: {e}") from e
    return module


def is_quantized(module: nn.Module) -> bool:
    """Whether some backend realised ``module``."""
    return any(b.holds(module) for _, b in BACKENDS.items())


def backend_of(module: nn.Module) -> QuantBackend:
    """The backend that realised ``module``."""
    for _, backend in BACKENDS.items():
        if backend.holds(module):
            return backend
    raise ValueError(f"{type(module).__name__} is not a quantized module")


def lora_custom_modules() -> dict[type, type]:
    """peft's LoRA layer for the quantized modules peft does not know (it handles bitsandbytes' own)."""
    out: dict[type, type] = {}
    for _, backend in BACKENDS.items():
        out |= backend.lora_layers()
    return out
