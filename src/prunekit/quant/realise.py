"""Realising a quantization plan: each planned weight as its quantize -> dequantize image for a while (the search's
objective), or each planned module replaced by its backend's quantized module (the quantize stage), and what the
result holds.

An embedding is held as its backend's quantized Linear of the same (vocab x hidden) matrix inside a
:class:`QuantizedEmbedding` (so only backends whose modules give back their dequantized weight can hold one:
:attr:`prunekit.quant.backend.QuantBackend.holds_embeddings`); a tied output head is that same module. Each scheme's
backend does the format's work; nothing here depends on the format.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM, Submodule
from prunekit.quant.backend import backend_for, is_quantized
from prunekit.quant.embedding import QuantizedEmbedding
from prunekit.quant.plan import _is_tied, _shape, check_embedding_scheme
from prunekit.quant.schemes import SCHEMES, QuantSettings, Scheme


def fake_quantize_weight(w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
    """``w`` after quantize -> dequantize in ``scheme`` (same dtype and device as ``w``)."""
    return backend_for(scheme).fake_quantize(w, scheme, settings)


@contextmanager
def fake_quantized(
    model: CausalLM,
    plan: Mapping[str, str],
    settings: QuantSettings,
    cache: dict[tuple[str, str], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside: each planned module's weight holds its quantize -> dequantize image; restored on exit.

    With a ``cache`` dict, images are kept by (module, scheme) and reused: a search revisits the same
    few images of every module, and bitsandbytes' 4-bit quantization costs ~0.1 s per MLP matrix on a CPU.
    """
    saved = []
    try:
        with torch.no_grad():
            for name, scheme_name in plan.items():
                module = model.get_submodule(name)
                saved.append((module, module.weight.data))
                image = cache.get((name, scheme_name)) if cache is not None else None
                if image is None:
                    image = fake_quantize_weight(module.weight.data, SCHEMES.get(scheme_name), settings)
                    if cache is not None:
                        cache[name, scheme_name] = image
                module.weight.data = image
        yield
    finally:
        for module, data in saved:
            module.weight.data = data


def realise(model: CausalLM, plan: Mapping[str, str], settings: QuantSettings) -> nn.Module:
    """Replace each planned Linear by its quantized module (in place); returns ``model``."""
    tied = _is_tied(model)
    for name, scheme_name in plan.items():
        linear = model.get_submodule(name)
        scheme = SCHEMES.get(scheme_name)
        if isinstance(linear, nn.Embedding):
            check_embedding_scheme(scheme, f"the token embedding {name}")
            module: nn.Module = QuantizedEmbedding(
                backend_for(scheme).realise(_as_linear(linear), scheme, settings), linear.weight.dtype
            )
        elif isinstance(linear, nn.Linear):
            module = backend_for(scheme).realise(linear, scheme, settings)
        else:
            raise PrunekitError(f"module '{name}' is {type(linear).__name__}, not a Linear: already quantized?")
        module.train(linear.training)  # bitsandbytes' int8 matmul takes another path in training mode
        _replace(model, name, module, tied)
    return model


def quantize_linears(layer: Submodule, names: Sequence[str], scheme: Scheme, settings: QuantSettings) -> None:
    """Replace (in place) every Linear of ``layer`` whose own name is in ``names`` by ``scheme``'s module."""
    for path, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names:
            quantized = backend_for(scheme).realise(module, scheme, settings)
            quantized.train(module.training)
            _replace(layer, path, quantized, tied=False)


def _as_linear(embedding: nn.Embedding) -> nn.Linear:
    """A Linear whose weight is ``embedding``'s matrix (shared, not copied)."""
    rows, cols = embedding.weight.shape
    linear = nn.Linear(cols, rows, bias=False, device="meta")
    linear.weight = embedding.weight
    return linear


def _replace(model: CausalLM, name: str, module: nn.Module, tied: bool) -> None:
    """Put ``module`` at ``name``; a quantized embedding of a tied model is its output head too."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
    if tied and isinstance(module, QuantizedEmbedding):
        model.set_output_embeddings(module.linear)
        # The tie is now the shared module; transformers' tie_weights() (lm-eval calls it) would look for the
        # embedding's float parameter: this model has no parameter ties left for it to make.
        model._tied_weights_keys = None
        model.all_tied_weights_keys = {}


def logical_param_count(model: CausalLM) -> tuple[int, int]:
    """(model parameters as their float shapes count them, LoRA adapter parameters); tied weights once.

    A quantized Linear counts in x out (+ bias) whatever its storage; adapter weights are counted apart.
    """
    seen: set[int] = set()
    params = adapters = 0
    for name, module in model.named_modules():
        if is_quantized(module):
            params += module.in_features * module.out_features
            if module.bias is not None:
                params += module.bias.numel()
            seen.update(id(p) for p in module.parameters())
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if "lora_" in f"{name}.{pname}":
                adapters += p.numel()
            else:
                params += p.numel()
    return params, adapters


def plan_cost_of_model(model: CausalLM, plan: Mapping[str, str]) -> float:
    """Mean nominal bits per planned weight of a realised (or plain) model, from module shapes."""
    bits = weights = 0
    for name, scheme in plan.items():
        rows, cols = _shape(model.get_submodule(name))
        n = rows * cols
        bits += SCHEMES.get(scheme).bits * n
        weights += n
    return bits / weights if weights else 0.0


def quantized_weight_bytes(model: CausalLM) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (codes, statistics, float weights),
    LoRA adapter weights excluded (see :func:`logical_param_count` for their count)."""
    seen: set[int] = set()
    total = 0
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        if id(t) in seen or "lora_" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit statistics live outside the parameter
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values())
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total
