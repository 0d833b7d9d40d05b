"""Round-to-nearest group-wise quantization in pure torch, and a Linear that stores its codes bit-packed; the
``rtn`` and ``float`` backends.

For a group x of ``group_size`` consecutive input weights of one output row and b bits:
with lo = min(min(x), 0) and hi = max(max(x), 0): ``scale = (hi - lo) / (2^b - 1)`` (rounded up to
float16), ``zero = round(-lo / scale)``, ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``,
``x_hat = (q - zero) * scale``. Because the range holds 0 and the stored scale is not below the exact
one, ``x / scale + zero`` stays within [-1/2, 2^b - 1/2], so ``|x - x_hat| <= scale / 2`` for every
weight (the theoretical bound the tests check, against the stored scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.quant.backend import BACKENDS, QuantBackend, load_state
from prunekit.quant.frozen import HoldsDecoded
from prunekit.quant.schemes import QuantSettings, Scheme


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit-packing of integer codes in [0, 2^bits) into a flat uint8 tensor."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    planes = (flat.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1  # (n, bits)
    stream = planes.reshape(-1)
    stream = F.pad(stream, (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, uint8."""
    if bits == 8:
        return packed[:count]
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    planes = stream[: count * bits].view(count, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(dim=1, dtype=torch.uint8)


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    rows, cols = w.shape
    pad = -cols % group_size
    if pad:  # a short last group: pad with its own first value, which changes neither min nor max
        w = torch.cat([w, w[:, -group_size + pad :][:, :1].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, group_size), pad


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (rows, cols), scale float16 (rows, groups), zero float16 (rows, groups)) of a 2-D weight."""
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g, _ = _groups(w.detach().float(), group_size)
    # The range always includes 0 (so the zero point is an exact code) and the scale is rounded *up*
    # to float16, so every value of the group lands within half a step of a code.
    lo, hi = g.amin(dim=-1).clamp(max=0.0), g.amax(dim=-1).clamp(min=0.0)
    qmax = 2**bits - 1
    raw = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    scale = raw.half()
    scale = torch.where(scale.float() < raw, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, qmax)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    zero = zero.half()  # an integer in [0, 255]: exact in float16
    codes = q.reshape(rows, -1)[:, :cols].to(torch.uint8)
    return codes, scale, zero


def rtn_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 weight from codes (rows, cols) and per-group float16 scale / zero."""
    rows, cols = codes.shape
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :cols]
    return (codes.float() - z) * s


def rtn_fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` quantized and dequantized (float32), as an :class:`RTNLinear` would compute with it."""
    return rtn_dequantize(*rtn_quantize(w, bits, group_size), group_size)


class RTNLinear(HoldsDecoded):
    """A Linear whose weight is stored as bit-packed RTN codes plus float16 scales and zeros.

    The forward pass dequantizes the weight (in ``compute_dtype``) and applies ``F.linear``; nothing is
    cached, so memory stays at the packed size between calls.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        n_groups = -(-in_features // group_size)
        n_bytes = -(-in_features * out_features * bits // 8)
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> RTNLinear:
        out = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            linear.bias is not None,
            linear.weight.dtype,
        ).to(linear.weight.device)
        codes, scale, zero = rtn_quantize(linear.weight, bits, group_size)
        out.qweight.copy_(pack_bits(codes, bits))
        out.scales.copy_(scale)
        out.zeros.copy_(zero)
        if linear.bias is not None and out.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_bits(self.qweight, self.bits, self.in_features * self.out_features)
        codes = codes.view(self.out_features, self.in_features)
        return rtn_dequantize(codes, self.scales, self.zeros, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.compute_weight()
        return F.linear(x.to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


class Float16Linear(nn.Module):
    """A Linear kept unquantized in a 16-bit dtype; inputs are cast to it and outputs back."""

    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Float16Linear:
        out = cls(linear.in_features, linear.out_features, dtype, linear.bias is not None).to(linear.weight.device)
        out.weight.data.copy_(linear.weight.detach())
        if linear.bias is not None and out.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class RTNBackend(QuantBackend):
    """Round-to-nearest with ``scheme.bits`` codes, a float16 scale and zero per group of ``group_size`` inputs."""

    name = "rtn"
    holds_embeddings = True

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        groups = rows * -(-cols // settings.group_size)
        return scheme.bits * rows * cols + 2 * 16 * groups

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        return rtn_fake_quantize(w, scheme.bits, settings.group_size).to(w.dtype)

    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        return RTNLinear.from_linear(linear, scheme.bits, settings.group_size)

    def holds(self, module: nn.Module) -> bool:
        return isinstance(module, RTNLinear)

    def lora_layers(self) -> dict[type, type]:
        from peft.tuners.lora.layer import Linear as LoraLinear

        return {RTNLinear: LoraLinear}

    def load(
        self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings, state: dict[str, torch.Tensor], device: str
    ) -> nn.Module:
        module = RTNLinear(linear.in_features, linear.out_features, scheme.bits, settings.group_size,
                           linear.bias is not None, linear.weight.dtype)  # fmt: skip
        return load_state(module, scheme, state, device)


class FloatBackend(QuantBackend):
    """Left unquantized, stored in the 16-bit dtype ``scheme.variant`` (float16 or bfloat16)."""

    name = "float"
    holds_embeddings = True

    def storage_bits(self, scheme: Scheme, rows: int, cols: int, settings: QuantSettings) -> int:
        return 16 * rows * cols

    def fake_quantize(self, w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
        return w.to(getattr(torch, scheme.variant)).to(w.dtype)

    def realise(self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings) -> nn.Module:
        return Float16Linear.from_linear(linear, getattr(torch, scheme.variant))

    def gguf_type(self, scheme: Scheme) -> str | None:
        return {"float16": "F16", "bfloat16": "BF16"}[scheme.variant]

    def holds(self, module: nn.Module) -> bool:
        return isinstance(module, Float16Linear)

    def lora_layers(self) -> dict[type, type]:
        from peft.tuners.lora.layer import Linear as LoraLinear

        return {Float16Linear: LoraLinear}

    def load(
        self, linear: nn.Linear, scheme: Scheme, settings: QuantSettings, state: dict[str, torch.Tensor], device: str
    ) -> nn.Module:
        module = Float16Linear(linear.in_features, linear.out_features, getattr(torch, scheme.variant),
                               linear.bias is not None)  # fmt: skip
        return load_state(module, scheme, state, device)


BACKENDS.register(RTNBackend.name)(RTNBackend())
BACKENDS.register(FloatBackend.name)(FloatBackend())
