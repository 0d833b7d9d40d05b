"""A model's size: parameters and the bytes they take (tied weights counted once)."""

from __future__ import annotations

from prunekit.models.types import CausalLM


def count_params(model: CausalLM) -> int:
    """Parameters of the model, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: CausalLM) -> int:
    """Bytes of the parameters as stored (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
