"""llama.cpp's block formats (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``) and K-quants (``q2_k`` ..
``q6_k``): the ``ggml`` backend.

A weight is stored as llama.cpp stores it in a GGUF file: each row in blocks of 32 input weights, each block its
codes and its float16 scale (and minimum, for the ``_1`` types), quantized and dequantized by llama.cpp's own
``gguf`` package; or, for the K-quants, in super-blocks of 256 weights with 6- or 8-bit sub-block scales, encoded
by llama.cpp's own quantizer and decoded by the ``gguf`` package (:func:`prunekit.quant.gguf_types.encode` /
:func:`~prunekit.quant.gguf_types.fake_quantize`). The search therefore scores exactly the weights the exported file
holds: the export encodes with the same function, so its blocks are these. A weight's input width must be a
multiple of 32 (256 for the K-quants; ``prune.round_to``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.quant.backend import BACKENDS, QuantBackend, load_state
from prunekit.quant.frozen import HoldsDecoded
from prunekit.quant.gguf_types import K_TYPES, check_encoder, check_fits, decode, encode, type_bytes
from prunekit.quant.gguf_types import fake_quantize as gguf_fake_quantize
from prunekit.quant.schemes import QuantSettings, Scheme


def dequantize(blocks: torch.Tensor, kind: str, rows: int, cols: int) -> torch.Tensor:
    """float32 (rows, cols) weight from its blocks, in torch on the blocks' device, with the arithmetic of the
    ``gguf`` package's dequantization (float32 products of the float16 scale and the integer code, plus the float16
    minimum for the ``_1`` formats), so the two agree bit for bit (tested); the forward pass of every step needs
    it at torch's speed. Block of 32 weights: float16 scale ``d``, [float16 minimum ``m``], [4 bytes: the fifth bit
    of each code, weight j at bit j], then 16 bytes of 4-bit codes (weight j < 16 in the low nibble of byte j,
    weight j + 16 in its high nibble); ``Q8_0``: ``d`` and 32 signed bytes. The K-quants are decoded by the ``gguf``
    package itself (in numpy, on the CPU: slower, same numbers)."""
    if kind in K_TYPES:
        return decode(blocks.reshape(rows, -1).cpu().numpy(), kind).reshape(rows, cols).to(blocks.device)
    b = blocks.reshape(rows * cols // 32, -1)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    if kind == "Q8_0":
        return (d * b[:, 2:].contiguous().view(torch.int8).float()).reshape(rows, cols)
    with_min = kind in ("Q4_1", "Q5_1")
    m = b[:, 2:4].contiguous().view(torch.float16).float() if with_min else None
    at = 4 if with_min else 2
    codes = torch.cat([b[:, at + 4 * (kind[1] == "5") :] & 0x0F, b[:, at + 4 * (kind[1] == "5") :] >> 4], dim=1).long()
    if kind[1] == "5":
        bits = (b[:, at : at + 4].long().unsqueeze(-1) >> torch.arange(8, device=b.device)) & 1
        codes = codes | (bits.reshape(-1, 32) << 4)
    if m is not None:
        return (d * codes.float() + m).reshape(rows, cols)
    return (d * (codes - (8 if kind == "Q4_0" else 16)).float()).reshape(rows, cols)


class GGMLLinear(HoldsDecoded):
    """A Linear whose weight is stored in a llama.cpp block format (``kind``: ``Q4_0`` ...), dequantized on each
    forward pass (in ``compute_dtype``); nothing is cached."""

    qweight: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self, in_features: int, out_features: int, kind: str, bias: bool, compute_dtype: torch.dtype = torch.float32
    ) -> None:
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
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, kind, linear.bias is not None, w.dtype).to(w.device)
        out.qweight.copy_(torch.from_numpy(encode(w, kind)))
        if linear.bias is not None and out.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.qweight, self.kind, self.out_features, self.in_features).to(self.compute_dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The dequantized weight's ``rows`` (a token embedding's lookup), without the others."""
        return dequantize(self.qweight[rows], self.kind, rows.numel(), self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.compute_weight()
        return F.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class GGMLBackend(QuantBackend):
    """llama.cpp's block format ``scheme.variant`` (``Q4_0`` ...: 32 weights per block with their scale; ``Q4_K``
    ...: 256 per super-block)."""

    name = "ggml"
    holds_embeddings = True

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        return 8 * type_bytes(scheme.variant, rows, cols)

    def check_available(self, scheme: Scheme) -> None:
        check_encoder(scheme.variant, f"scheme '{scheme.name}'")

    def check_shape(self, scheme: Scheme, rows: int, cols: int, what: str) -> None:
        check_fits(scheme.variant, cols, what)

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        return gguf_fake_quantize(w, scheme.variant)

    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        return GGMLLinear.from_linear(linear, scheme.variant)

    def gguf_type(self, scheme: Scheme) -> str | None:
        return scheme.variant  # the file holds the very blocks

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
