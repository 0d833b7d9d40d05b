"""Apply a plan to a model: physically (a smaller dense model) or as a mask (zeros, same shapes),
and save the result so that ``from_pretrained`` loads it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.plan import Plan, UnitLayout
from prunekit.units import UNITS

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Parameters of the model, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters as stored (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prunable_layers(n_layers: int, skip_first: int, skip_last: int) -> list[int]:
    """Indices of the layers that may be pruned, first and last ones left whole."""
    if skip_first + skip_last >= n_layers:
        raise PrunekitError(
            f"prune.skip_first={skip_first} + prune.skip_last={skip_last} leaves no layer of {n_layers} to prune"
        )
    return list(range(skip_first, n_layers - skip_last))


def layouts(model: nn.Module, adapter: ModelAdapter, units: list[str], layers: list[int]) -> list[UnitLayout]:
    """The unit counts and sizes the planner needs, for the given unit types and layers."""
    out = []
    for idx in layers:
        layer = adapter.layers(model)[idx]
        for name in units:
            ut = UNITS.get(name)
            out.append(
                UnitLayout(
                    name,
                    idx,
                    ut.count(adapter, layer),
                    ut.params_per_unit(adapter, layer),
                    ut.groups(adapter, layer),
                )
            )
    return out


@torch.no_grad()
def apply_plan(model: nn.Module, adapter: ModelAdapter, plan: Plan, mode: str = "slice") -> nn.Module:
    """Keep only the plan's units, in place. ``mode="mask"`` zeroes the others instead of removing them."""
    if mode not in ("slice", "mask"):
        raise ValueError(f"mode must be 'slice' or 'mask', got {mode!r}")
    layers = adapter.layers(model)
    for unit, per_layer in plan.keep.items():
        ut = UNITS.get(unit)
        for idx, keep in per_layer.items():
            if not 0 <= idx < len(layers):
                raise PrunekitError(f"plan names layer {idx} but the model has {len(layers)} layers")
            n = ut.count(adapter, layers[idx])
            if keep and (max(keep) >= n or min(keep) < 0):
                raise PrunekitError(f"plan keeps {unit} {max(keep)} of layer {idx}, which has only {n}")
            ut.apply(adapter, layers[idx], torch.tensor(sorted(keep), dtype=torch.long), mode)
            if mode == "slice":
                adapter.refresh_layer(layers[idx])
    if mode == "slice":
        model.config = config_for(model, adapter)
    return model


def config_for(model: nn.Module, adapter: ModelAdapter) -> Any:
    """The config describing the model's current widths: stock when uniform and stock accepts it."""
    sizes = adapter.all_layer_sizes(model)
    if len(set(sizes)) == 1:
        try:
            return adapter.stock_config(model.config, sizes[0])
        except (ValueError, TypeError, StrictDataclassClassValidationError) as e:
            # e.g. transformers 5 requires hidden_size % num_attention_heads == 0 in stock Llama.
            log.info("uniform widths, but the stock config rejects them (%s); saving a prunekit config", e)
    return adapter.pruned_config(model.config, sizes)


def rebuild(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    """A fresh instance of the class that ``from_pretrained`` would pick, holding the model's weights."""
    config = config_for(model, adapter)
    config._attn_implementation = model.config._attn_implementation
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with init_empty_weights():
        fresh = cls(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"rebuilt model does not match: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device).eval()


def save_model(model: nn.Module, adapter: ModelAdapter, tokenizer: Any, out_dir: Path) -> None:
    """Save weights (safetensors), config and tokenizer in ``out_dir``."""
    fresh = rebuild(model, adapter)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
