"""llama.cpp's block formats (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``): the ``ggml`` backend.

A weight is stored as llama.cpp stores it in a GGUF file: each row in blocks of 32 input weights, each block its
codes and its float16 scale (and minimum, for the ``_1`` types), quantized and dequantized by llama.cpp's own
``gguf`` package (:func:`prunekit.export.gguf.encode` / :func:`~prunekit.export.gguf.fake_quantize`). The search
therefore scores exactly the weights the exported file holds: the export encodes with the same function, so its
blocks are these. A weight's input width must be a multiple of 32 (``prune.round_to``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.quant.backend import BACKENDS, QuantBackend, load_state
from prunekit.quant.schemes import QuantSettings, Scheme


def _dequantize(blocks: torch.Tensor, kind: str, rows: int, cols: int) -> torch.Tensor:
    import gguf

    from prunekit.export.gguf import qtype

    values = gguf.quants.dequantize(blocks.cpu().numpy(), qtype(kind))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(rows, cols)


class GGMLLinear(nn.Module):
    """A Linear whose weight is stored in a llama.cpp block format (``kind``: ``Q4_0`` ...), dequantized on each
    forward pass (in ``compute_dtype``); nothing is cached."""

    def __init__(
        self, in_features: int, out_features: int, kind: str, bias: bool, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        from prunekit.export.gguf import check_fits, type_bytes

        super().__init__()
        check_fits(kind, in_features, f"a {out_features} x {in_features} weight")
        self.in_features, self.out_features, self.kind, self.compute_dtype = (
            in_features,
            out_features,
            kind,
            compute_dtype,
        )
        row_bytes = type_bytes(kind, 1, in_features)
        # Named as peft looks for a quantized weight (it reads the device from it).
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> GGMLLinear:
        from prunekit.export.gguf import encode

        w = linear.weight
        out = cls(linear.in_features, linear.out_features, kind, linear.bias is not None, w.dtype).to(w.device)
        out.qweight.copy_(torch.from_numpy(encode(w, kind)))
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        w = _dequantize(self.qweight, self.kind, self.out_features, self.in_features)
        return w.to(device=self.qweight.device, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        return F.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class GGMLBackend(QuantBackend):
    """llama.cpp's block format ``scheme.variant`` (``Q4_0`` ...): 32 weights per block with their scale."""

    name = "ggml"

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        from prunekit.export.gguf import type_bytes

        return 8 * type_bytes(scheme.variant, rows, cols)

    def check_shape(self, scheme: Scheme, rows: int, cols: int, what: str) -> None:
        from prunekit.export.gguf import check_fits

        check_fits(scheme.variant, cols, what)

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        from prunekit.export.gguf import fake_quantize

        return fake_quantize(w, scheme.variant)

    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        return GGMLLinear.from_linear(linear, scheme.variant)

    def holds(self, module: nn.Module) -> bool:
        return isinstance(module, GGMLLinear)

    def lora_layers(self) -> dict[type, type]:
        from peft.tuners.lora.layer import Linear as LoraLinear

        return {GGMLLinear: LoraLinear}

    def load(
        self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings, state: dict[str, torch.Tensor], device: str
    ) -> nn.Module:
        module = GGMLLinear(linear.in_features, linear.out_features, scheme.variant, linear.bias is not None,
                            linear.weight.dtype)  # fmt: skip
        return load_state(module, scheme, state, device)


BACKENDS.register(GGMLBackend.name)(GGMLBackend())
