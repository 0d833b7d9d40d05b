"""bitsandbytes' formats: LLM.int8 (``bnb_int8``) and 4-bit NormalFloat / float (``bnb_4bit``).

bitsandbytes on CPUs with AVX512-BF16: the first eval / no-grad forward of a ``Linear4bit`` repacks its weight in
place for a faster kernel, after which training silently gets no gradient through it and the saved state changes
layout. Every realised ``Linear4bit`` gets ``support_avx512bf16_for_cpu = False``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from prunekit.quant.backend import BACKENDS, QuantBackend, load_state
from prunekit.quant.schemes import BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, QuantSettings, Scheme


class _Bnb(QuantBackend):
    @abstractmethod
    def _empty(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        """An unfilled bitsandbytes module of ``linear``'s shape."""

    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        module = self._empty(linear, scheme, settings)
        module.load_state_dict({k: v.detach().clone() for k, v in linear.state_dict().items()})
        module = module.to(linear.weight.device)  # bitsandbytes quantizes on the move to a device
        _guard_repacking(module)
        return module


class BnbInt8(_Bnb):
    """LLM.int8: one int8 per weight, a float32 absmax per row; input outliers through a 16-bit side path."""

    name = "bnb_int8"

    def holds(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Linear8bitLt"  # by name: no bitsandbytes import to ask

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        return 8 * rows * cols + 32 * rows

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        """The vector-wise int8 image without LLM.int8's run-time outlier path (which depends on the inputs):
        the realised module can only be closer to the float weight than this."""
        import bitsandbytes.functional as bnbf

        # float16, as bitsandbytes' Int8Params quantizes a weight (its CUDA kernel accepts nothing else).
        codes, stats, _ = bnbf.int8_vectorwise_quant(w.detach().half().contiguous())
        return bnbf.int8_vectorwise_dequant(codes, stats).to(w.dtype)

    def dequantize(self, module: Any) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).float()

    def _empty(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=settings.int8_threshold,
        )

    def load(
        self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings, state: dict[str, torch.Tensor], device: str
    ) -> nn.Module:
        # Moved to the device first (bitsandbytes refuses saved codes in a module it has not quantized).
        return load_state(self._empty(linear, scheme, settings), scheme, state, device)


class Bnb4bit(_Bnb):
    """4-bit codes (``scheme.variant``: nf4 or fp4), a float32 absmax per block of 64 (or double-quantized)."""

    name = "bnb_4bit"

    def holds(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Linear4bit"

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        n = rows * cols
        blocks = -(-n // BNB_BLOCKSIZE)
        if settings.double_quant:
            return 4 * n + 8 * blocks + 32 * -(-blocks // BNB_NESTED_BLOCKSIZE)
        return 4 * n + 32 * blocks

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            w.detach().contiguous(),
            blocksize=BNB_BLOCKSIZE,
            compress_statistics=settings.double_quant,
            quant_type=scheme.variant,
        )
        return bnbf.dequantize_4bit(packed, state).to(w.dtype)

    def dequantize(self, module: Any) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    def _empty(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            compress_statistics=settings.double_quant,
            quant_type=scheme.variant,
        )

    def load(
        self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings, state: dict[str, torch.Tensor], device: str
    ) -> nn.Module:
        import bitsandbytes as bnb

        module = self._empty(linear, scheme, settings)
        stats = {k[len("weight.") :]: v for k, v in state.items() if k.startswith("weight.")}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=state["weight"], quantized_stats=stats, requires_grad=False, device=device
        )
        if linear.bias is not None:
            module.bias = nn.Parameter(state["bias"].to(device), requires_grad=False)
        _guard_repacking(module)
        return module


def _guard_repacking(module: Any) -> None:
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


BACKENDS.register(BnbInt8.name)(BnbInt8())
BACKENDS.register(Bnb4bit.name)(Bnb4bit())
